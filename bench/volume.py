"""Benchmark (not a test): reconstruct a 300-slice 512x512 CT series.

Writes the series to a temporary folder first (not timed), then times
``build_volume`` and ``load_volume`` (selection + reconstruction) against SimpleITK's
``ImageSeriesReader`` (GDCM) on the same files: median of 3 runs each.

    .venv/bin/python bench/volume.py [--slices 300] [--size 512] [--threads 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PipelineConfig, VolumeConfig  # noqa: E402
from pipeline.volume import build_volume, load_volume  # noqa: E402
from tests.pipeline.ctfactory import SeriesSpec, head_hu, write_series  # noqa: E402


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = SeriesSpec(n_slices=args.slices, rows=args.size, cols=args.size,
                          pixel_spacing=(0.45, 0.45), slice_spacing=0.625, thickness=0.625,
                          origin=(-115.0, -115.0, -90.0), hu_fn=head_hu, storage="unsigned",
                          bits_stored=12)
        t0 = time.perf_counter()
        files = write_series(folder, spec)
        print(f"wrote {len(files)} files of {args.size}x{args.size} in "
              f"{time.perf_counter() - t0:.1f} s (not timed)")
        vcfg = VolumeConfig(read_threads=args.threads)
        pcfg = PipelineConfig(volume=vcfg)
        vol = build_volume(files, vcfg)  # warm-up (imports, page cache)

        def gdcm() -> sitk.Image:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            return reader.Execute()

        ref = gdcm()
        same = np.array_equal(sitk.GetArrayFromImage(ref).astype(np.float32), vol.hu)
        t_build = median_time(lambda: build_volume(files, vcfg), args.runs)
        t_load = median_time(lambda: load_volume(folder, pcfg), args.runs)
        t_gdcm = median_time(gdcm, args.runs)
        print(f"build_volume  ({args.threads} threads): {t_build:.2f} s (median of {args.runs})")
        print(f"load_volume   (selection + build): {t_load:.2f} s")
        print(f"SimpleITK ImageSeriesReader (GDCM): {t_gdcm:.2f} s")
        print(f"ratio build_volume / GDCM: {t_build / t_gdcm:.2f}; "
              f"load_volume / GDCM: {t_load / t_gdcm:.2f}; voxels identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
