"""Networks, input preparation, weights files and the lesion table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import Study, image_for
from pipeline.errors import InferenceError
from pipeline.findings import LABELS, SUBTYPE_CODE
from pipeline.lesions import find_lesions, one_extra_axial_subtype
from pipeline.models.classifier import ClassifierArch, build_classifier
from pipeline.models.config import ModelsConfig, OperatingPoints
from pipeline.models.inputs import (
    ModelGrid,
    classifier_spec,
    neighbour_index,
    segmenter_spec,
    slice_inputs,
)
from pipeline.models.segmenter import N_CLASSES, SegmenterArch, build_segmenter
from pipeline.models.weights import WeightsMeta, load_weights, save_weights, sidecar_path

# Where each subtype sits in the toy head (fractions of the matrix: row, column, radius)
# and its HU, so that a tiny network can tell them apart in a few steps.
_TOY_BLOBS: dict[str, tuple[float, float, float, float]] = {
    "epidural": (0.25, 0.5, 0.08, 100.0), "intraparenchymal": (0.5, 0.3, 0.09, 75.0),
    "intraventricular": (0.5, 0.5, 0.07, 60.0), "subarachnoid": (0.7, 0.66, 0.07, 130.0),
    "subdural": (0.5, 0.74, 0.07, 160.0)}


def toy_study(seed: int, subtypes: tuple[str, ...] = (), matrix: int = 32, slices: int = 8,
              spacing: tuple[float, float, float] = (5.0, 7.0, 7.0)) -> Study:
    """A tiny synthetic head: skull ring, brain at 35 HU, one blob per subtype on the
    middle slices (each subtype with its own place and HU), noise. Test data only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:matrix, 0:matrix] / matrix
    r = np.hypot(yy - 0.5, xx - 0.5)
    plane = np.where(r < 0.45, 1000.0, -1000.0)
    plane = np.where(r < 0.4, 35.0, plane)
    hu = np.repeat(plane[None], slices, axis=0).astype(np.float32)
    hu += rng.normal(0, 4, hu.shape).astype(np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    labels = np.zeros((slices, len(LABELS)), np.uint8)
    z0, z1 = slices // 4, slices // 4 + max(2, slices // 2)
    for name in subtypes:
        cy, cx, rad, value = _TOY_BLOBS[name]
        blob = np.hypot(yy - cy, xx - cx) < rad
        for k in range(z0, z1):
            hu[k][blob] = value + rng.normal(0, 4, int(blob.sum()))
            mask[k][blob] = SUBTYPE_CODE[name]
            labels[k, 0] = 1
            labels[k, LABELS.index(name)] = 1
    return Study(f"toy-{seed}", hu, image_for(hu, spacing), labels, mask)


def test_label_order_is_rsna() -> None:
    assert LABELS == ("any", "epidural", "intraparenchymal", "intraventricular",
                      "subarachnoid", "subdural")
    assert [SUBTYPE_CODE[s] for s in LABELS[1:]] == [1, 2, 3, 4, 5]
    assert N_CLASSES == 6


def test_specs_and_channels() -> None:
    assert classifier_spec(64, 1).channels == 5
    assert classifier_spec(64, 0).channels == 3
    assert segmenter_spec(64, 1).channels == 9
    assert segmenter_spec(64, 2).channels == 15
    spec = segmenter_spec(64, 1)
    assert type(spec).from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_classifier_shapes() -> None:
    torch.manual_seed(0)
    net = build_classifier(ClassifierArch(in_channels=5, widths=(8, 16), embedding=16,
                                          hidden=8)).eval()
    x = torch.rand(2, 7, 5, 32, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    with torch.no_grad():
        sl, se = net(x, valid)
        assert sl.shape == (2, 7, 6) and se.shape == (2, 6)
        # Padded slices do not change the series output of the shorter series.
        _, se_short = net(x[1:, :5])
    torch.testing.assert_close(se[1:], se_short, atol=1e-5, rtol=1e-5)


def test_classifier_for_larger_input_adds_a_stem_and_keeps_the_region_grid() -> None:
    small, large = ClassifierArch.for_size(128, 5), ClassifierArch.for_size(256, 5)
    assert large.widths == (8, *small.widths) and large.aux_stride == 2 * small.aux_stride
    torch.manual_seed(0)
    net = build_classifier(large)
    emb, aux = net.encoder.forward_with_aux(torch.rand(2, 5, 256, 256))
    assert emb.shape == (2, small.embedding)
    assert aux.shape == (2, 6, 256 // large.aux_stride, 256 // large.aux_stride) == (2, 6, 16, 16)


def test_segmenter_shapes() -> None:
    net = build_segmenter(SegmenterArch(in_channels=9, features=(4, 4, 8, 8, 16, 4))).eval()
    with torch.no_grad():
        out = net(torch.rand(3, 9, 32, 32))
    assert out.shape == (3, 6, 32, 32)


def test_segmenter_trained_on_crops_predicts_tile_by_tile() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 9, 64, 64)
    tiled = build_segmenter(SegmenterArch(features=(4, 4, 8, 8, 16, 4), tile=32)).eval()
    whole = build_segmenter(SegmenterArch(features=(4, 4, 8, 8, 16, 4))).eval()
    whole.load_state_dict(tiled.state_dict())
    assert SegmenterArch.from_dict(tiled.arch.to_dict()) == tiled.arch
    # Metadata written before tiling existed has no "tile": whole slices.
    older = {k: v for k, v in tiled.arch.to_dict().items() if k != "tile"}
    assert SegmenterArch.from_dict(older).tile == 0
    with torch.no_grad():
        assert torch.equal(whole.predict(x), whole(x))
        out = tiled.predict(x)
        assert out.shape == (2, 6, 64, 64)
        # Each tile is normalised on its own (instance norm): not the whole-slice output.
        assert not torch.allclose(out, tiled(x), atol=1e-3)
        # A slice no larger than a tile is one tile.
        assert torch.equal(tiled.predict(x[..., :32, :32]), tiled(x[..., :32, :32]))


def test_neighbours_and_inputs() -> None:
    idx = neighbour_index(4, 1)
    np.testing.assert_array_equal(idx, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    win = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 2, 2) \
        + torch.tensor([0.0, 0.1, 0.2])[None, :, None, None]
    x = slice_inputs(win.contiguous(), classifier_spec(2, 1), np.array([0, 2]))
    assert x.shape == (2, 5, 2, 2)
    np.testing.assert_allclose(x[1, :, 0, 0], [2.0, 2.1, 2.2, 1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, 0], [0.0, 0.1, 0.2, 0.0, 1.0], rtol=1e-6)
    s = slice_inputs(win.contiguous(), segmenter_spec(2, 1), np.array([3]))
    np.testing.assert_allclose(s[0, :, 0, 0], [3.0, 3.1, 3.2, 2.0, 2.1, 2.2, 3.0, 3.1, 3.2],
                               rtol=1e-6)


def test_model_grid_round_trip_non_square() -> None:
    grid = ModelGrid.for_shape((2, 48, 64), 32)
    assert grid.side == 64 and grid.pad == (8, 0)
    planes = torch.zeros(2, 1, 48, 64)
    planes[:, :, 10:30, 20:40] = 1.0
    small = grid.to_model(planes)
    assert small.shape == (2, 1, 32, 32)
    back = grid.to_volume(small)
    assert back.shape == (2, 1, 48, 64)
    assert ((back > 0.5) == (planes > 0.5)).float().mean() > 0.97


def _meta(kind: str = "segmenter", size: int = 32) -> WeightsMeta:
    spec = segmenter_spec(size, 1) if kind == "segmenter" else classifier_spec(size, 1)
    return WeightsMeta(kind="segmenter" if kind == "segmenter" else "classifier",
                       name="test", version="0", spec=spec,
                       architecture=SegmenterArch(features=(4, 4, 8, 8, 16, 4)).to_dict(),
                       operating_points={name: 0.5 for name in LABELS})


def test_weights_round_trip_and_refusals(tmp_path: Path) -> None:
    net = build_segmenter(SegmenterArch(features=(4, 4, 8, 8, 16, 4)))
    path = tmp_path / "seg.pt"
    meta = save_weights(net.state_dict(), path, _meta())
    side = json.loads(sidecar_path(path).read_text())
    assert side["sha256"] == meta.sha256 and len(meta.sha256) == 64
    assert side["label_order"] == list(LABELS)
    assert side["input_spec"]["size"] == 32 and side["input_spec"]["channels"] == 9
    state, loaded = load_weights(path, segmenter_spec(32, 1), "segmenter")
    assert loaded == meta and set(state) == set(net.state_dict())

    with pytest.raises(InferenceError, match=r"size: 32 vs 64"):
        load_weights(path, segmenter_spec(64, 1))
    with pytest.raises(InferenceError, match=r"neighbours: 1 vs 2"):
        load_weights(path, segmenter_spec(32, 2))
    with pytest.raises(InferenceError, match="holds a segmenter, expected a classifier"):
        load_weights(path, segmenter_spec(32, 1), "classifier")

    bad = json.loads(sidecar_path(path).read_text())
    bad["label_order"] = bad["input_spec"]["labels"] = list(reversed(LABELS))
    sidecar_path(path).write_text(json.dumps(bad))
    with pytest.raises(InferenceError, match="label order"):
        load_weights(path, segmenter_spec(32, 1))

    save_weights(net.state_dict(), path, _meta())
    with path.open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(InferenceError, match="sha256"):
        load_weights(path, segmenter_spec(32, 1))
    sidecar_path(path).unlink()
    with pytest.raises(InferenceError, match="metadata .* is missing"):
        load_weights(path, segmenter_spec(32, 1))
    with pytest.raises(InferenceError, match="does not exist"):
        load_weights(tmp_path / "none.pt", segmenter_spec(32, 1))


def test_config_thresholds_and_validation() -> None:
    cfg = ModelsConfig()
    assert cfg.classifier_path.name == "classifier.pt"
    assert cfg.classifier_path.parent.name == "weights"
    stored = {name: 0.3 for name in LABELS}
    resolved = ModelsConfig(thresholds=OperatingPoints(subdural=0.7)).thresholds.resolve(stored)
    assert resolved["subdural"] == 0.7 and resolved["any"] == 0.3
    with pytest.raises(ValueError, match="extra"):
        ModelsConfig.model_validate({"batchsize": 3})
    with pytest.raises(ValueError, match="same file"):
        ModelsConfig(classifier_weights=Path("a.pt"), segmenter_weights=Path("a.pt"))
    for name, field in ModelsConfig.model_fields.items():
        assert field.description and "Default" in field.description, name


def test_lesions_volume_centroid_and_small_components() -> None:
    mask = np.zeros((10, 40, 40), np.uint8)
    mask[2:6, 10:20, 10:20] = SUBTYPE_CODE["subdural"]  # 400 voxels
    mask[8, 30, 30] = SUBTYPE_CODE["subdural"]  # 1 voxel: below the minimum
    mask[3:5, 30:34, 2:6] = SUBTYPE_CODE["epidural"]  # 32 voxels
    hu = np.zeros(mask.shape, np.float32)
    image = image_for(hu, (5.0, 0.5, 0.5), origin_xyz=(-10.0, -10.0, 100.0))
    lesions, cleaned = find_lesions(mask, image, min_volume_ml=0.01)
    assert [les.subtype for les in lesions] == ["epidural", "subdural"]
    sdh = lesions[1]
    assert sdh.voxels == 400 and sdh.volume_ml == pytest.approx(400 * 1.25 / 1000)
    assert sdh.slices == (2, 5) and sdh.largest_slice == 2
    assert sdh.centroid_mm == pytest.approx((-10 + 14.5 * 0.5, -10 + 14.5 * 0.5, 100 + 3.5 * 5))
    assert sdh.extent_mm == pytest.approx((5.0, 5.0, 20.0))
    assert cleaned[8, 30, 30] == 0 and cleaned[3, 15, 15] == SUBTYPE_CODE["subdural"]
    # Diagonal neighbours belong to the same component (26-connectivity).
    diag = np.zeros((3, 5, 5), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = 1
    found, _ = find_lesions(diag, image_for(diag.astype(np.float32), (1.0, 1.0, 1.0)), 0.0)
    assert len(found) == 1 and found[0].voxels == 3
    with pytest.raises(ValueError, match="codes"):
        find_lesions(np.full((3, 5, 5), 7, np.uint8), image_for(diag.astype(np.float32),
                                                                (1.0, 1.0, 1.0)))


def test_an_extra_axial_collection_gets_one_subtype() -> None:
    epi, sub, iph, ivh = (SUBTYPE_CODE[s] for s in ("epidural", "subdural", "intraparenchymal",
                                                    "intraventricular"))
    mask = np.zeros((4, 30, 30), np.uint8)
    mask[1:3, 2:12, 2:5] = sub  # one convexity collection: 60 subdural voxels ...
    mask[1:3, 12:15, 2:5] = epi  # ... and 18 epidural voxels touching them
    mask[1:3, 20:23, 20:22] = epi  # a separate epidural collection stays epidural
    mask[1:3, 20:23, 22:23] = sub  # with a smaller subdural rim
    mask[0:2, 10:14, 12:16] = iph  # a parenchymal bleed with ventricular extension
    mask[2:4, 10:14, 12:16] = ivh
    out = one_extra_axial_subtype(mask)
    assert (out[1:3, 2:15, 2:5] == sub).all()
    assert (out[1:3, 20:23, 20:23] == epi).all()
    np.testing.assert_array_equal(out[:, 10:14, 12:16], mask[:, 10:14, 12:16])
    assert (out == 0).sum() == (mask == 0).sum()
    empty = np.zeros((2, 4, 4), np.uint8)
    assert one_extra_axial_subtype(empty) is empty
