"""Inference time and peak memory per study: classifier and segmenter on 512 x 512 slices.

    .venv/bin/python bench/inference.py [--slices 40 300] [--repeat 3] [--device cpu]

Each case runs in its own subprocess so that peak memory (``ru_maxrss``) belongs to that
case alone. The volume is a phantom study (``pipeline.phantom``) of the requested size;
the weights are the configured ones (default: the shipped demo weights). Prints a
markdown table: median wall time of preprocessing (windows + resize), classifier,
segmenter (including resizing logits back to 512 x 512 and the argmax), lesion table and
the whole ``run_models`` call, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_case(slices: int, repeat: int, device: str, threads: int) -> dict[str, float]:
    """Time ``repeat`` runs on one volume (after one warm-up run) in this process."""
    import torch

    from pipeline.inference import load_models, run_models
    from pipeline.models.config import ModelsConfig
    from pipeline.phantom import generate_volume
    from pipeline.volume import ReconstructionReport, Volume

    config = ModelsConfig.model_validate({"device": device, "threads": threads})
    t0 = time.perf_counter()
    models = load_models(config)
    load_s = time.perf_counter() - t0
    study = generate_volume(20_000 + slices, shape=(slices, 512, 512),
                            subtypes=["subdural:20", "intraparenchymal:8"])
    from pipeline.datasets import phantom_to_study

    ref = phantom_to_study(study, "bench")
    volume = Volume(hu=ref.hu, image=ref.image, source_sop_uids=[None] * slices,
                    frame_of_reference_uid=None, series_uid="bench", study_uid="bench",
                    report=ReconstructionReport())
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    run_models(volume, models, config)  # warm-up
    runs = []
    for _ in range(repeat):
        runs.append(run_models(volume, models, config).timings_s)
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["load_s"] = load_s
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["volume_mb"] = ref.hu.nbytes / 2**20
    out["rss_before_mb"] = base_rss
    out["threads"] = float(torch.get_num_threads())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[40, 300])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=0, help="0: all CPUs of the process")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.repeat, args.device, args.threads)))
        return 0
    rows = []
    for n in args.slices:
        done = subprocess.run(
            [sys.executable, __file__, "--case", str(n), "--repeat", str(args.repeat),
             "--device", args.device, "--threads", str(args.threads)],
            check=True, capture_output=True, text=True)
        rows.append((n, json.loads(done.stdout.strip().splitlines()[-1])))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Inference per study, 512 x 512 slices, device {args.device}, "
          f"{int(rows[0][1]['threads'])} torch threads on {cpus} CPU(s) "
          f"({platform.processor() or platform.machine()}), median of {args.repeat} after "
          "a warm-up\n")
    print("| slices | preprocess s | classifier s | segmenter s | lesions s | total s | "
          "peak RSS MiB (volume MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n} | {r['preprocess']:.2f} | {r['classifier']:.2f} | {r['segmenter']:.2f} "
              f"| {r['lesions']:.2f} | {r['total']:.2f} | {r['peak_rss_mb']:.0f} "
              f"({r['volume_mb']:.0f}) |")
    print(f"\nModel load (both networks, sha256 checks): {rows[0][1]['load_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
