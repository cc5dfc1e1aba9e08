"""The two-stage cascade: stage 1 finds the liver on whole slices, stage 2 segments liver and lesions in the
liver's box at full detail. Its crop geometry by hand, one card for both stages, training both on real
cases, both runtimes and precisions, and the checks that refuse a tampered stage."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import ModelIntegrityError
from LiverSegLib.geometry import bounding_box, canonical_transform
from LiverSegLib.model import BUNDLED_CARD, ModelCard, read_card, write_card
from LiverSegLib.pipeline import LiverSegmenter, label_map_in_box, stage1_liver, stage1_liver_extent, stage2_crop, stage2_gate
from LiverSegLib.preprocessing import CROP_MARGIN_SLICES, label_crop, liver_crop, prepare_label, prepare_volume
from LiverSegLib.runtime import export_int8_graph
from LiverSegTraining.cli import train_main

from conftest import PROJECT_ROOT, read_case, tiny_config
from test_plots import read_strict_json


def test_liver_crop_by_hand():
    """A liver box grown by 10 mm in plane (15 rows of 0.7 mm, 13 columns of 0.8 mm: the margin rounded up
    to whole voxels) and by CROP_MARGIN_SLICES along z; at the volume's edges the crop stops there."""
    assert CROP_MARGIN_SLICES == 3
    box = (slice(10, 20), slice(100, 200), slice(50, 150))
    assert liver_crop(box, (40, 512, 512), (1.6, 0.7, 0.8), 10.0) == (slice(7, 23), slice(85, 215), slice(37, 163))
    at_edges = (slice(0, 2), slice(0, 10), slice(500, 512))
    assert liver_crop(at_edges, (4, 512, 512), (1.6, 0.7, 0.8), 10.0) == (slice(0, 4), slice(0, 25), slice(487, 512))
    assert liver_crop(box, (40, 512, 512), (1.6, 0.7, 0.8), 0.1)[1:] == (slice(99, 201), slice(49, 151))  # at least a voxel


def test_stage2_gate_by_hand():
    """Stage 1's liver is one model-grid pixel (row 10, col 10 of 20) on slice 4 of the slices run 0, 4, 8;
    the slice grid is 40 × 40 (2 slice pixels a model pixel), 1 mm pixels and 2 mm slices, so a model pixel
    is 2 mm. A 4 mm gate: in plane the model pixels within 2 pixels (13 of them, a disk), each 2 × 2 slice
    pixels; along z the slices within 2 of slice 4 and those whose nearest slice run is 4 (1-7), not 0, 8, 9."""
    liver = np.zeros((3, 20, 20), bool)
    liver[1, 10, 10] = True
    slices_run = np.array([0, 4, 8])
    whole = (slice(0, 10), slice(0, 40), slice(0, 40))
    gate = stage2_gate(liver, slices_run, whole, (10, 40, 40), (2.0, 1.0, 1.0), 4.0)
    assert gate.shape == (10, 40, 40)
    assert [int(z) for z in np.flatnonzero(gate.any(axis=(1, 2)))] == [1, 2, 3, 4, 5, 6, 7]
    disk = np.add.outer((np.arange(20) - 10) ** 2, (np.arange(20) - 10) ** 2) <= 4
    assert disk.sum() == 13
    assert np.array_equal(gate[4], np.kron(disk, np.ones((2, 2), bool)))
    assert all(np.array_equal(gate[z], gate[4]) for z in range(1, 8))
    # Only part of the grid (stage 2's crop), on a slice grid padded to a square: 30 rows sit 5 below the top
    # of the 40-pixel square, so slice row r is model row (r + 5) // 2 and model row 10 is slice rows 15-16.
    crop = (slice(3, 6), slice(10, 25), slice(16, 40))
    part = stage2_gate(liver, slices_run, crop, (10, 30, 40), (2.0, 1.0, 1.0), 0.5)
    assert part.shape == (3, 15, 24)
    rows, cols = np.nonzero(part[1])
    assert (rows + 10).tolist() == [15, 15, 16, 16] and (cols + 16).tolist() == [20, 21, 20, 21]


def test_gate_applies_before_the_clean_up():
    """``label_map_in_box`` keeps no channel outside ``allowed``: two liver blobs, the larger one outside the
    gate, give the smaller one (the largest component is taken after the gate), and its lesion."""
    card = ModelCard(input_size=8)
    probabilities = np.zeros((4, 2, 8, 8), np.float32)
    probabilities[:, 0, 0:3, 0:3] = 0.9  # small blob, allowed
    probabilities[1:3, 1, 1, 1] = 0.9  # a lesion inside it
    probabilities[:, 0, 4:8, 4:8] = 0.9  # larger blob, outside the gate
    allowed = np.zeros((4, 8, 8), bool)
    allowed[:, :4, :4] = True
    region = (slice(0, 4), slice(0, 8), slice(0, 8))
    box, label_map = label_map_in_box(probabilities, region, card, 1.0, allowed=allowed)
    assert box == (slice(0, 4), slice(0, 8), slice(0, 8))
    assert int((label_map >= 1).sum()) == 4 * 9 and int((label_map == 2).sum()) == 2
    _, ungated = label_map_in_box(probabilities, region, card, 1.0)
    assert int((ungated >= 1).sum()) == 4 * 16  # without the gate the larger blob wins


def test_canonical_spacing_follows_the_axes():
    """Index j along S and k along P (a coronal acquisition): spacing (i, j, k) = (0.7, 2.5, 0.9) mm is
    (2.5, 0.9, 0.7) mm along the canonical (S, P, L) axes; an axial one keeps (k, j, i)."""
    coronal = canonical_transform((1, 0, 0, 0, 0, 1, 0, 1, 0))
    assert coronal.canonical_spacing_mm((0.7, 2.5, 0.9)) == (2.5, 0.9, 0.7)
    assert canonical_transform((1, 0, 0, 0, 1, 0, 0, 0, 1)).canonical_spacing_mm((0.7, 0.8, 2.5)) == (2.5, 0.8, 0.7)


def test_stage_cards_round_trip_and_refuse_unknown_fields():
    card = ModelCard(name="m", version="1.0.0", input_size=128, threshold=0.4)
    stage2 = replace(card, input_size=256, crop_margin_mm=20.0, weights_file="liverseg.stage2.safetensors", weights_sha256="ab" * 32)
    cascade = card.with_stage(2, stage2)
    assert cascade.stages == 2 and card.stages == 1
    again = cascade.stage_card(2)
    assert (again.input_size, again.crop_margin_mm, again.weights_file, again.threshold) == (256, 20.0, "liverseg.stage2.safetensors", 0.4)
    assert again.stages == 1 and cascade.stage_card(1) is cascade
    assert ModelCard.from_dict(read_strict_json_text(cascade.to_json())).stage_card(2) == again  # through JSON (lists become tuples)
    with pytest.raises(ModelIntegrityError, match="stage2 has unknown fields: lesion_threshold"):
        ModelCard.from_dict({**read_strict_json_text(cascade.to_json()), "stage2": {**cascade.stage2, "lesion_threshold": 0.3}})
    with pytest.raises(ModelIntegrityError, match="no stage 2"):
        card.stage_card(2)


def read_strict_json_text(text: str) -> dict:
    import json

    return json.loads(text)


def stage1_crop(segmenter: LiverSegmenter, ct: sitk.Image, card) -> tuple:
    """(crop, gate of that crop) stage 2 gets on the CPU: stage 1 (``segmenter``'s network) on its probes and
    the liver's ends; the gate's margin is the crop's."""
    transform = canonical_transform(ct.GetDirection())
    canonical_ct = transform.to_canonical(sitk.GetArrayViewFromImage(ct))
    volume = prepare_volume(canonical_ct, card.window_hu, card.input_size)
    probabilities, slices_run = stage1_liver_extent(segmenter.network, volume, card, 16)
    assert len(slices_run) < len(volume) / 2  # a third of the slices, about
    liver, spacing_mm = stage1_liver(probabilities, slices_run, card), transform.canonical_spacing_mm(ct.GetSpacing())
    crop = stage2_crop(liver, slices_run, canonical_ct.shape, card, spacing_mm)
    return crop, stage2_gate(liver, slices_run, crop, canonical_ct.shape, spacing_mm, card.stage_card(2).crop_margin_mm)


def test_stage2_crop_holds_every_expert_liver_voxel(data_root, segmenter):
    """Stage 2's crop from the bundled network as stage 1 (its largest liver component on the probes and the
    liver's ends, reachable box, a 20 mm margin) holds the whole expert liver of each expert case, so stage 2
    can reach every liver voxel, its gate (20 mm around stage 1's liver) all but a thousandth of it (the
    geometry of the gate on real grids, orientations and spacings), and the crop lies within a few voxels of the crop around the label that training
    takes. These are the bundled model's training patients: a check of the crop, not of accuracy."""
    card = read_card(BUNDLED_CARD).with_stage(2, replace(read_card(BUNDLED_CARD), crop_margin_mm=20.0))
    for name in ("ircad_01", "ircad_07", "ircad_17"):
        ct, truth_image = read_case(data_root, name)
        transform = canonical_transform(ct.GetDirection())
        canonical_truth = transform.to_canonical(sitk.GetArrayFromImage(truth_image))
        crop, gate = stage1_crop(segmenter, ct, card)
        assert int((canonical_truth[crop] >= 1).sum()) == int((canonical_truth >= 1).sum()), name
        assert int((canonical_truth[crop][gate] >= 1).sum()) >= 0.999 * int((canonical_truth >= 1).sum()), name
        from_label = liver_crop(bounding_box(canonical_truth >= 1, margin=0), canonical_truth.shape, transform.canonical_spacing_mm(ct.GetSpacing()), 20.0)
        assert all(abs(a.start - b.start) <= 12 and abs(a.stop - b.stop) <= 12 for a, b in zip(crop, from_label)), (name, crop, from_label)


@pytest.fixture(scope="module")
def cascade_model(data_root, tmp_path_factory) -> Path:
    """A cascade trained by ``liverseg-train`` with the cascade recipe (its networks, margin and
    augmentations) shrunk: both stages 64 px, a few steps, the lesion settings fixed."""
    folder = tmp_path_factory.mktemp("cascade")
    argv = [str(PROJECT_ROOT / "LiverSegTraining/configs/cascade.toml"), "--output", str(folder / "run")]
    for override in tiny_config(folder, data_root, ["stage2.model.input_size=64", "lesion.selection='fixed'"]):
        argv += ["--set", override]
    assert train_main(argv) == 0
    return folder / "run" / "model" / "liverseg.json"


def with_bundled_stage1(cascade_card_path: Path, folder: Path) -> Path:
    """The bundled model's files and card, plus the stage 2 of ``cascade_card_path``: one folder, one card."""
    folder.mkdir()
    for path in BUNDLED_CARD.parent.iterdir():
        shutil.copy(path, folder / path.name)
    trained = read_card(cascade_card_path)
    for name in (trained.stage2["weights_file"], trained.stage2["onnx_file"]):
        shutil.copy(cascade_card_path.parent / name, folder / name)
    # stage 2 without its int8 graph, as export_onnx_graph leaves it: what export_int8_graph then adds is tested on its own
    stage2 = replace(trained.stage_card(2), int8_onnx_file="", int8_onnx_sha256="", int8_calibration={})
    write_card(read_card(BUNDLED_CARD).with_stage(2, stage2), folder / "liverseg.json")
    return folder / "liverseg.json"


def test_training_a_cascade_exports_one_card_for_both_stages(cascade_model):
    card = read_strict_json(cascade_model)
    stage2 = card["stage2"]
    assert card["crop_margin_mm"] == 0.0 and card["input_size"] == 64
    assert card["encoder"] == stage2["encoder"] == "tu-regnetx_002" and stage2["decoder_channels"] == [64, 32, 16, 8, 8]
    assert stage2["crop_margin_mm"] == 15.0 and stage2["input_size"] == 64
    assert stage2["weights_file"] == "liverseg.stage2.safetensors" and stage2["onnx_file"] == "liverseg.stage2.onnx"
    assert len(stage2["weights_sha256"]) == 64 and stage2["weights_sha256"] != card["weights_sha256"]
    assert card["training"]["stage2"]["epochs"] == 2 and card["training"]["stage2"]["crop_margin_mm"] == 15.0
    # both stages' int8 graphs, written by the export (stage 2's calibrated on the labelled livers' crops)
    assert card["int8_onnx_file"] == "liverseg.int8.onnx" and stage2["int8_onnx_file"] == "liverseg.stage2.int8.onnx"
    assert stage2["int8_calibration"]["crop"].startswith("each case's labelled liver") and stage2["int8_calibration"]["weights_sha256"] == stage2["weights_sha256"]
    assert (cascade_model.parent.parent / "final" / "stage2" / "history.json").is_file()
    segmenter = LiverSegmenter(cascade_model, device="cpu")
    assert segmenter.runtime == "onnxruntime" and segmenter.precision == "int8"


def test_export_onnx_writes_every_stage(cascade_model, tmp_path, capsys):
    """``liverseg export-onnx`` on a cascade writes both graphs again, the same bytes, and names each."""
    from LiverSegLib.cli import main

    folder = tmp_path / "model"
    shutil.copytree(cascade_model.parent, folder)
    before = {name: (folder / name).read_bytes() for name in ("liverseg.onnx", "liverseg.stage2.onnx")}
    assert main(["export-onnx", "--model", str(folder / "liverseg.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [str(folder / "liverseg.onnx"), str(folder / "liverseg.stage2.onnx")]
    assert all((folder / name).read_bytes() == data for name, data in before.items())


def test_cascade_segments_inside_stage1_box_with_either_runtime(cascade_model, data_root, tmp_path):
    """Stage 2 runs on its crop of stage 1's liver only, the label map is zero outside it and outside the
    gate around stage 1's liver and on the CT's grid, ONNX Runtime and torch give the same stage-2 probabilities, and progress runs through both halves."""
    card_path = with_bundled_stage1(cascade_model, tmp_path / "model")
    ct, _ = read_case(data_root, "ircad_17")
    steps: list[tuple[int, int]] = []
    segmenter = LiverSegmenter(card_path, device="cpu", precision="fp32")
    result = segmenter.segment(ct, keep_probabilities=True, progress=lambda done, total: steps.append((done, total)))
    transform = canonical_transform(ct.GetDirection())
    expected, gate = stage1_crop(segmenter, ct, segmenter.card)
    assert result.region == expected and segmenter.card.stage_card(2).gate_margin_mm == 3.0  # the recipe's gate
    depth = expected[0].stop - expected[0].start
    assert result.probabilities.shape == (depth, 2, 64, 64)
    assert result.label_image.GetSize() == ct.GetSize() and result.label_image.GetSpacing() == ct.GetSpacing()
    label = transform.to_canonical(sitk.GetArrayViewFromImage(result.label_image))
    outside = np.ones(label.shape, bool)
    outside[expected] = ~gate
    assert not label[outside].any() and label[expected].any() and not gate.all()
    fractions = [done / total for done, total in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and any(f == 0.5 for f in fractions)
    with_torch = LiverSegmenter(card_path, device="cpu", runtime="torch").segment(ct, keep_probabilities=True)
    assert with_torch.region == expected
    assert np.abs(with_torch.probabilities - result.probabilities).max() < 1e-4
    # The crop the network saw is the engine's preprocessing of that region (the same function as training's).
    stage2 = segmenter.card.stage_card(2)
    crop_volume = prepare_volume(transform.to_canonical(sitk.GetArrayViewFromImage(ct))[expected], stage2.window_hu, stage2.input_size)
    assert crop_volume.shape == (depth, 64, 64)


def test_int8_graph_per_stage_and_tampered_stage2_refused(cascade_model, data_root, tmp_path):
    """export_int8_graph quantises stage 2 on crops of its training cases' labelled livers; with both int8
    graphs the CPU runs int8 end to end. A changed byte in stage 2's weights stops every load."""
    card_path = with_bundled_stage1(cascade_model, tmp_path / "model")
    assert LiverSegmenter(card_path, device="cpu").precision == "mixed"  # stage 1 int8, stage 2 fp32 only
    card = export_int8_graph(card_path, data_root, stage=2)
    calibration = card.stage2["int8_calibration"]
    assert card.stage2["int8_onnx_file"] == "liverseg.stage2.int8.onnx" and calibration["crop"].startswith("each case's labelled liver")
    assert calibration["weights_sha256"] == card.stage2["weights_sha256"]
    assert LiverSegmenter(card_path, device="cpu").precision == "int8"
    weights = card_path.parent / "liverseg.stage2.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for runtime in ("onnxruntime", "torch"):
        with pytest.raises(ModelIntegrityError, match="stage-2 model weights liverseg.stage2.safetensors fails its SHA-256 check"):
            LiverSegmenter(card_path, device="cpu", runtime=runtime)


def test_stage2_training_crops_are_the_labelled_liver_box(data_root, tmp_path):
    """Stage 2 trains on the crop ``label_crop`` takes: the labelled liver's rows and columns grown by the
    margin (rounded up to whole voxels), on every slice of the scan."""
    from LiverSegTraining.config import load_config
    from LiverSegTraining.data import prepare_case
    from LiverSegTraining.sources import discover

    config = load_config(None, tiny_config(tmp_path, data_root, ["stage2.model={input_size=64, crop_margin_mm=15.0}"])).stage2_config()
    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "totalseg_example_sm_MODEL"]
    prepared = prepare_case(case, config.card(), tmp_path / "cache")
    ct, label = case.load()
    transform = canonical_transform(ct.GetDirection())
    canonical_label = transform.to_canonical(label)
    spacing_mm = transform.canonical_spacing_mm(ct.GetSpacing())
    _, rows, cols = bounding_box(canonical_label >= 1, margin=0)
    crop = label_crop(canonical_label, spacing_mm, 15.0)
    grow = [math.ceil(15.0 / spacing) for spacing in spacing_mm[1:]]
    assert crop == (slice(0, canonical_label.shape[0]),
                    slice(max(rows.start - grow[0], 0), min(rows.stop + grow[0], canonical_label.shape[1])),
                    slice(max(cols.start - grow[1], 0), min(cols.stop + grow[1], canonical_label.shape[2])))
    assert prepared.image.shape == (canonical_label.shape[0], 64, 64)
    assert int(prepared.masks[:, 0].sum()) == int(prepare_label(canonical_label[crop], 64)[:, 0].sum()) > 0


def test_cascade_cross_validation_reports_stage1_alone(data_root, tmp_path):
    """Cross-validating a cascade trains both stages per fold, evaluates the cascade and, on the same patient,
    the fold's stage 1 alone; RESULTS.md and crossval_stage1.csv give that comparison."""
    from test_runner import _small_expert_cases

    from LiverSegTraining.config import load_config
    from LiverSegTraining.runner import crossvalidate, write_results

    _small_expert_cases(data_root, tmp_path / "cases")
    overrides = tiny_config(tmp_path, data_root, [f"data=[{{layout = 'cases', path = '{tmp_path / 'cases'}'}}]", "split.weak_train=[]",
                                                  "split.val=[]", "split.exclude=[]", "stage2.model={input_size=64, crop_margin_mm=15.0}"])
    rows, summary = crossvalidate(load_config(None, overrides), tmp_path / "cv", folds=["small_b"])
    assert [r["case"] for r in rows] == ["small_b"] and (tmp_path / "cv" / "fold_small_b" / "stage2" / "best.pt").is_file()
    alone = summary["stage1_alone"]["per_case"]
    assert [(r["case"], r["fold"]) for r in alone] == [("small_b", "small_b")]
    assert (tmp_path / "cv" / "crossval_stage1.csv").is_file()
    write_results(rows, summary, tmp_path / "cv" / "RESULTS.md", "test")
    assert "Stage 1 alone: each fold's first network" in (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")


def test_stage1_whole_extent_runs_every_slice_around_the_liver(data_root, segmenter):
    """What a cut of stage 1's liver needs on the CPU: with ``whole_extent`` stage 1 runs its probes and every
    slice from the probe before the liver's first to the probe after its last, one block, and gives the same
    probabilities on the slices both runs share (the network sees each slice on its own)."""
    from LiverSegLib.inference import PROBE_STRIDE

    card = read_card(BUNDLED_CARD)
    ct = read_case(data_root, "ircad_01")[0]
    volume = prepare_volume(canonical_transform(ct.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(ct)), card.window_hu, card.input_size)
    probes_output, probes_run = stage1_liver_extent(segmenter.network, volume, card, 16)
    whole_output, whole_run = stage1_liver_extent(segmenter.network, volume, card, 16, whole_extent=True)
    liver = stage1_liver(probes_output, probes_run, card)
    found = probes_run[np.flatnonzero(liver.any(axis=(1, 2)))]
    block = np.arange(max(found[0] - PROBE_STRIDE + 1, 0), min(found[-1] + PROBE_STRIDE, len(volume)))
    assert np.array_equal(whole_run, np.union1d(probes_run, block)) and set(probes_run) <= set(whole_run)
    assert len(block) > 2 * np.count_nonzero((probes_run >= block[0]) & (probes_run <= block[-1]))  # more than the probes and ends there
    shared = np.intersect1d(probes_run, whole_run)
    assert np.abs(whole_output[shared] - probes_output[shared]).max() < 1e-5


def test_stage1_cut_narrows_the_gate_by_hand():
    """Stage 1 (6×12×12, 1 mm, model grid = slice grid) finds the true liver (rows and columns 1-5 on slices
    1-4, 100 HU, p = 0.9) and a blob beside it it is unsure of (columns 6-8, p = 0.6) of the background's 0 HU.
    A card that cuts stage 1's liver (smoothness 10, contrast 10 HU) gates stage 2 around the true liver alone:
    with a 1 mm margin the gate reaches column 6 but no longer columns 7-8; without the cut, or with stage 1's
    slices not run one after another, the blob stays in the gate."""
    from LiverSegLib.model import ModelCard
    from LiverSegLib.pipeline import cascade_gate, gate_liver

    truth = np.zeros((6, 12, 12), bool)
    truth[1:5, 1:6, 1:6] = True
    probabilities = np.zeros((6, 2, 12, 12), np.float32)
    probabilities[:, 0][truth] = 0.9
    probabilities[1:5, 0, 1:6, 6:9] = 0.6
    ct = np.where(truth, 100.0, 0.0).astype(np.float32)
    stage2 = ModelCard(input_size=12, crop_margin_mm=5.0, gate_margin_mm=1.0)
    plain = ModelCard(input_size=12).with_stage(2, stage2)
    cut = replace(plain, graph_cut={"smoothness": 10.0, "contrast_hu": 10.0})
    spacing_mm, run, whole = (1.0, 1.0, 1.0), np.arange(6), (slice(0, 6), slice(0, 12), slice(0, 12))
    liver = stage1_liver(probabilities, run, cut)
    assert np.count_nonzero(liver) == 160
    assert np.array_equal(gate_liver(cut, probabilities, run, liver, ct, spacing_mm), truth)
    assert np.array_equal(gate_liver(plain, probabilities, run, liver, ct, spacing_mm), liver)
    gaps = np.array([0, 1, 3, 4, 5])  # slice 2 not run: no cut
    assert np.array_equal(gate_liver(cut, probabilities, gaps, stage1_liver(probabilities, gaps, cut), ct, spacing_mm), stage1_liver(probabilities, gaps, cut))
    gated = cascade_gate(cut, liver, run, whole, ct.shape, spacing_mm, probabilities, ct)
    ungated = cascade_gate(plain, liver, run, whole, ct.shape, spacing_mm, probabilities, ct)
    assert gated[1:5, 1:6, 6].all() and not gated[:, :, 7:9].any() and ungated[1:5, 1:6, 7:9].all()


def test_cascade_with_a_stage1_cut_is_gated_by_the_cut_liver(cascade_model, data_root, tmp_path):
    """A cascade card whose stage 1 has a graph cut (and a 5 mm gate) through the whole engine on the CPU:
    stage 1 runs every slice around its liver, stage 2's crop is that of stage 1's uncut liver, and no label
    lies outside the gate around the cut liver (``gate_liver`` of the same stage-1 output, computed here) but
    the holes the clean-up fills inside the gated label."""
    from LiverSegLib.pipeline import gate_liver
    from LiverSegLib.postprocessing import fill_holes

    card_path = with_bundled_stage1(cascade_model, tmp_path / "model")
    card = read_card(card_path)
    cut_card = replace(card, graph_cut={"smoothness": 128.0, "contrast_hu": 10.0})
    cut_card = cut_card.with_stage(2, replace(cut_card.stage_card(2), gate_margin_mm=5.0, graph_cut={}))
    write_card(cut_card, card_path)
    ct, _ = read_case(data_root, "ircad_07")
    segmenter = LiverSegmenter(card_path, device="cpu", precision="fp32")
    result = segmenter.segment(ct, keep_probabilities=True)
    transform = canonical_transform(ct.GetDirection())
    canonical_ct = transform.to_canonical(sitk.GetArrayFromImage(ct))
    spacing_mm = transform.canonical_spacing_mm(ct.GetSpacing())
    volume = prepare_volume(canonical_ct, card.window_hu, card.input_size)
    probabilities, slices_run = stage1_liver_extent(segmenter.network, volume, cut_card, 16, whole_extent=True)
    assert np.array_equal(result.stage1_slices, slices_run) and np.all(np.diff(result.stage1_slices[result.stage1_liver.any(axis=(1, 2))]) == 1)
    liver = stage1_liver(probabilities, slices_run, cut_card)
    assert result.region == stage2_crop(liver, slices_run, canonical_ct.shape, cut_card, spacing_mm)
    cut_liver = gate_liver(cut_card, probabilities, slices_run, liver, canonical_ct, spacing_mm)
    gate = stage2_gate(cut_liver, slices_run, result.region, canonical_ct.shape, spacing_mm, 5.0)
    label = transform.to_canonical(sitk.GetArrayViewFromImage(result.label_image))
    outside = np.ones(label.shape, bool)
    outside[result.region] = ~gate
    kept = (label > 0) & ~outside
    assert label.any() and np.array_equal((label > 0) & outside, fill_holes(kept) & outside)  # beyond the gate: holes the clean-up filled only
    assert not np.array_equal(cut_liver, liver)  # the cut moved stage 1's liver on this CT
