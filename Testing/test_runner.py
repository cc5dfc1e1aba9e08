"""Cross-validation by patient (LiverSegTraining/runner.py) on the real expert cases: each fold tests on
the patient it did not train on, and ``--folds`` restricts the held-out cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from LiverSegTraining.cli import train_main
from LiverSegTraining.config import load_config

from conftest import tiny_config
from test_plots import read_strict_json


def test_cross_validation_by_patient(data_root, tmp_path):
    """Leave-one-patient-out over two expert cases: each fold tests on the patient it did not train on, and
    also segments the validation case (model-made label, never trained on) to count its false lesions."""
    from LiverSegTraining.runner import crossvalidate

    overrides = tiny_config(tmp_path, data_root, ["split.exclude=['ircad_07']", "split.weak_train=[]"])
    config = load_config(None, overrides)
    all_rows, summary = crossvalidate(config, tmp_path / "cv")
    validation = [r for r in all_rows if r["label"] == "model"]
    assert [(r["case"], r["fold"]) for r in validation] == [("totalseg_example_dicom_MODEL", "ircad_01"), ("totalseg_example_dicom_MODEL", "ircad_17")]
    assert all("lesion_dice" not in r and r["lesion_false_count"] >= 0 for r in validation)
    assert summary["validation_false_lesions"] == pytest.approx(sum(r["lesion_false_count"] for r in validation) / 2)
    rows = [r for r in all_rows if r["label"] == "expert"]
    assert summary["mean_liver_dice"] == pytest.approx(sum(r["liver_dice"] for r in rows) / 2)  # the expert rows only
    assert [r["case"] for r in rows] == ["ircad_01", "ircad_17"] == [r["fold"] for r in rows]
    assert [r["trained_on"] for r in rows] == ["ircad_17", "ircad_01"]
    assert all(0.0 <= r["liver_dice"] <= 1.0 and "lesion_dice" in r for r in rows)
    # Per-lesion detection on every fold (ircad_01 has 7 tumours, ircad_17 has 2).
    assert [r["lesion_true_count"] for r in rows] == [7, 2]
    assert all(0 <= r["lesion_detected_count"] <= r["lesion_true_count"] and r["lesion_false_count"] >= 0 for r in rows)
    # Each held-out patient also on its scan cut through the liver; the validation cases are not.
    assert all(0.0 <= r["liver_dice_cut_scan"] <= 1.0 and 0.0 <= r["liver_dice_cut_scan_whole"] <= 1.0 for r in rows)
    assert not any("liver_dice_cut_scan" in r for r in validation) and "mean_liver_dice_cut_scan" in summary
    # ... and as 5 mm slices: liver and lesion Dice on the thick slices (both patients label lesions).
    assert all(0.0 <= r["liver_dice_thick_slices"] <= 1.0 and 0.0 <= r["lesion_dice_thick_slices"] <= 1.0 for r in rows)
    assert not any("liver_dice_thick_slices" in r for r in validation) and "mean_liver_dice_thick_slices" in summary
    assert all(0.0 <= r["liver_dice_small_fov"] <= 1.0 and 0.0 <= r["liver_dice_small_fov_whole"] <= 1.0 for r in rows)
    assert (tmp_path / "cv" / "crossval.csv").read_text(encoding="utf-8").count("\n") == 5
    assert [r["case"] for r in read_strict_json(tmp_path / "cv" / "crossval.json")] == [r["case"] for r in all_rows]
    for case in ("ircad_01", "ircad_17"):  # the held-out case, segmented by the full engine
        assert (tmp_path / "cv" / f"fold_{case}" / f"panel_{case}.png").stat().st_size > 5000
    assert "lesions_validated" in summary


def test_crossval_folds_option(data_root, tmp_path, capsys):
    """--folds holds out only the named cases and trains no final model; an unknown name is refused."""
    argv = ["--crossval", "--folds", "ircad_17", "--output", str(tmp_path / "cv")]
    for override in tiny_config(tmp_path, data_root, ["split.exclude=['ircad_07']", "split.weak_train=[]", "split.val=[]"]):
        argv += ["--set", override]
    from conftest import PROJECT_ROOT

    config_path = str(PROJECT_ROOT / "LiverSegTraining/configs/bundled.toml")
    assert train_main([config_path, *argv]) == 0
    assert sorted(p.name for p in (tmp_path / "cv").iterdir() if p.is_dir()) == ["fold_ircad_17"]
    results = (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")
    assert "| ircad_17 |" in results and "| lesion_recall | lesion_false_count | lesion_false_ml | liver_dice_cut_scan |" in results
    assert train_main([config_path, *argv[:2], "ircad_99", *argv[3:]]) == 2
    assert "ircad_99" in capsys.readouterr().err
    assert train_main([config_path, "--folds", "ircad_17"]) == 2


def _inner_case(name: str, lesion_probabilities: dict, truth_lesion: list = ()):
    """A hand-made inner case on a 6×12×12 grid of 0.2 mL voxels (the model grid is the slice grid): a
    liver at probability 0.9 everywhere inside a margin, lesion probabilities at the given voxels, and
    the true lesion at ``truth_lesion``'s voxels (none: a lesion-free liver)."""
    import numpy as np

    from LiverSegTraining.runner import InnerCase

    probabilities = np.zeros((6, 2, 12, 12), np.float32)
    probabilities[1:5, 0, 1:11, 1:11] = 0.9
    for voxel, probability in lesion_probabilities.items():
        probabilities[(voxel[0], 1, voxel[1], voxel[2])] = probability
    truth = (probabilities[:, 0] >= 0.5).astype(np.uint8)
    for voxel in truth_lesion:
        truth[voxel] = 2
    region = tuple(slice(0, size) for size in truth.shape)
    return InnerCase(name, probabilities, region, truth, voxel_ml=0.2, has_lesions=bool(truth_lesion))


def test_hand_made_probabilities_pick_the_known_best_settings():
    """A true 3-voxel lesion (0.6 mL) at probability 0.65; on a lesion-free liver a false 8-voxel lesion at
    0.55 and a false 1-voxel speck at 0.95. Only threshold 0.6 finds the lesion without the false one
    (0.7 misses it), and only a 0.5 mL bar drops the speck and keeps the lesion (1.0 mL drops it too)."""
    from LiverSegTraining.config import LesionConfig
    from LiverSegTraining.runner import ModelCard, select_lesion_settings

    true_lesion = [(2, 5, 5), (2, 5, 6), (2, 5, 7)]
    lesion_case = _inner_case("with_lesion", {voxel: 0.65 for voxel in true_lesion}, true_lesion)
    false_blob = {(z, r, c): 0.55 for z in (2, 3) for r in (3, 4) for c in (3, 4)}
    free_liver = _inner_case("lesion_free", {**false_blob, (2, 8, 8): 0.95})
    chosen = select_lesion_settings([lesion_case, free_liver], ModelCard(), LesionConfig())
    assert (chosen["lesion_threshold"], chosen["min_lesion_ml"]) == (0.6, 0.5)
    assert chosen["mean_lesion_dice"] == 1.0 and chosen["false_lesions_per_free_liver"] == 0.0
    assert chosen["chosen_on"] == ["with_lesion", "lesion_free"]
    # Nothing to tell the candidates apart: the card's own behaviour (its threshold, no minimum size).
    plain = select_lesion_settings([_inner_case("plain", {})], ModelCard(), LesionConfig())
    assert (plain["lesion_threshold"], plain["min_lesion_ml"]) == (0.5, 0.0)


def test_a_lesion_rule_wins_only_where_the_ct_shows_what_the_network_misses_by_hand():
    """Inner cases with a CT (1 mm voxels): the liver at 100 and 110 HU in a checkerboard (median 100, MAD 10:
    a spread of 14.8 HU). The true lesion, a 2×2×2 block at 20 HU, has no lesion probability: every network
    candidate misses it, the rule (k 3: below 55.5 HU, no smoothing or erosion) finds it exactly; on the
    lesion-free liver it finds nothing. Where the CT is plain, rule and network tie and the network stays."""
    import numpy as np

    from LiverSegTraining.config import LesionConfig
    from LiverSegTraining.runner import ModelCard, select_lesion_settings

    def with_ct(case, dark_voxels=()):
        z, r, c = np.indices(case.truth.shape)
        case.ct = np.where((z + r + c) % 2 == 0, 100.0, 110.0).astype(np.float32)
        case.ct[case.truth == 0] = -100.0
        for voxel in dark_voxels:
            case.ct[voxel] = 20.0
        case.spacing_mm = (1.0, 1.0, 1.0)
        return case

    block = [(z, r, c) for z in (2, 3) for r in (5, 6) for c in (5, 6)]
    grid = LesionConfig(rule_sigmas_mm=[0.0], rule_erodes_mm=[0.0], rule_k_mads=[3.0, 8.0])
    cases = [with_ct(_inner_case("with_lesion", {}, block), block), with_ct(_inner_case("lesion_free", {}))]
    chosen = select_lesion_settings(cases, ModelCard(), grid)
    assert chosen["lesion_rule"] == {"sigma_mm": 0.0, "erode_mm": 0.0, "k_mad": 3.0}  # k 8: below −18 HU, misses it
    assert chosen["mean_lesion_dice"] == 1.0 and chosen["false_lesions_per_free_liver"] == 0.0
    plain = select_lesion_settings([with_ct(_inner_case("plain", {}))], ModelCard(), grid)
    assert plain["lesion_rule"] == {} and (plain["lesion_threshold"], plain["min_lesion_ml"]) == (0.5, 0.0)


def test_a_size_bar_applied_afterwards_is_the_engines_map_with_that_bar():
    """The inner choice makes each lesion source's maps once without a size bar and applies each bar to a copy
    (``with_size_bar``): the same maps as the engine makes with the bar, for the network's lesions (a 3-voxel
    and an 8-voxel lesion and a speck, 0.2 mL voxels) and for a rule's (the same blocks darker in the CT)."""
    import numpy as np

    from LiverSegTraining.runner import ModelCard, inner_label_map, with_lesion_settings, with_size_bar

    lesions = {(2, 5, 5): 0.65, (2, 5, 6): 0.65, (2, 5, 7): 0.65, (2, 8, 8): 0.95}
    lesions.update({(z, r, c): 0.55 for z in (2, 3) for r in (2, 3) for c in (2, 3)})
    case = _inner_case("three_sizes", lesions)
    case.ct = np.where(case.truth > 0, 100.0, -100.0).astype(np.float32)
    for voxel in lesions:
        case.ct[voxel] = 20.0
    case.spacing_mm = (1.0, 1.0, 1.0)
    sources = [{"lesion_threshold": 0.5, "lesion_rule": {}}, {"lesion_threshold": 0.5, "lesion_rule": {"sigma_mm": 0.0, "erode_mm": 0.0, "k_mad": 3.0}}]
    for source in sources:
        unbarred = inner_label_map(case, with_lesion_settings(ModelCard(), {**source, "min_lesion_ml": 0.0}))
        assert np.count_nonzero(unbarred == 2) == 12
        for bar_ml, lesion_voxels in ((0.1, 12), (0.5, 11), (1.0, 8), (2.0, 0)):
            barred = with_size_bar(unbarred, bar_ml, case.voxel_ml)
            engine = inner_label_map(case, with_lesion_settings(ModelCard(), {**source, "min_lesion_ml": bar_ml}))
            assert np.array_equal(barred, engine) and np.count_nonzero(barred == 2) == lesion_voxels
        assert np.count_nonzero(unbarred == 2) == 12  # the copy was barred, not the source's map


def test_gate_margin_chosen_by_inner_liver_dice_by_hand():
    """A 6×12×12 inner case of 1 mm voxels (model grid = slice grid): the true liver is rows and columns 1-5
    on slices 1-4 (100 voxels), where stage 1 also put it; stage 2 marks it and a larger false blob at rows
    and columns 7-11 on every slice (150 voxels), 2 pixels away. No gate: the false blob is the largest
    component (liver Dice 0). A 1 mm gate (stage 1's liver grown by a pixel) keeps the true liver alone
    (Dice 1); 10 mm lets the blob back in. Between margins that tie, the card's own, then the wider."""
    import numpy as np

    from LiverSegLib.model import ModelCard
    from LiverSegTraining.runner import InnerCase, mean_inner_liver_dice, select_gate_margin, with_gate_margin

    truth = np.zeros((6, 12, 12), np.uint8)
    truth[1:5, 1:6, 1:6] = 1
    probabilities = np.zeros((6, 2, 12, 12), np.float32)
    probabilities[:, 0] = truth * 0.9
    probabilities[:, 0, 7:12, 7:12] = 0.9
    whole = (slice(0, 6), slice(0, 12), slice(0, 12))
    case = InnerCase("hand", probabilities, whole, truth, voxel_ml=0.001, has_lesions=False,
                     stage1_liver=truth.astype(bool), stage1_slices=np.arange(6), spacing_mm=(1.0, 1.0, 1.0))
    card = ModelCard(input_size=12).with_stage(2, ModelCard(input_size=12, crop_margin_mm=5.0, gate_margin_mm=3.0))
    assert mean_inner_liver_dice([case], with_gate_margin(card, 0.0)) == 0.0
    assert mean_inner_liver_dice([case], with_gate_margin(card, 1.0)) == 1.0
    chosen = select_gate_margin([case], card, [0.0, 1.0, 10.0])
    assert chosen == {"gate_margin_mm": 1.0, "mean_liver_dice_by_gate_margin": {"0": 0.0, "1": 1.0, "10": 0.0}}
    model_made = InnerCase("model_made", probabilities, whole, (probabilities[:, 0] >= 0.5).astype(np.uint8), voxel_ml=0.001, has_lesions=False,
                           stage1_liver=truth.astype(bool), stage1_slices=np.arange(6), spacing_mm=(1.0, 1.0, 1.0), expert=False)
    assert select_gate_margin([case, model_made], card, [0.0, 1.0, 10.0]) == chosen  # a model-made label's liver is no judge
    assert select_gate_margin([case], card, [1.0, 3.0])["gate_margin_mm"] == 3.0  # a tie: the card's own
    assert select_gate_margin([case], card, [1.0, 1.5])["gate_margin_mm"] == 1.5  # a tie: the wider


def test_graph_cut_chosen_by_inner_liver_dice_by_hand():
    """A 6×12×12 inner case of 1 mm voxels (model grid = slice grid, one stage): the true liver, rows and columns
    1-5 on slices 1-4 (100 voxels, 100 HU, p = 0.9), and beside it a blob the network is unsure of (rows 1-5,
    columns 6-8, 60 voxels, p = 0.6) of the background's 0 HU. No cut: the blob is liver (Dice 200 / 260). A
    cut of smoothness 10, contrast 10 HU: keeping the blob costs its 74 faces with the background (no edge,
    10 a face), dropping it 60 × log(0.6 / 0.4) and the faces it shares with the liver across a 100 HU edge
    (nothing): Dice 1. Smoothness 0.001 moves nothing (its faces round to no cost), a tie with no cut, which
    wins, unless the card's own cut is the weak one."""
    import numpy as np

    from LiverSegLib.model import ModelCard
    from LiverSegTraining.runner import InnerCase, mean_inner_liver_dice, select_graph_cut, with_graph_cut

    truth = np.zeros((6, 12, 12), np.uint8)
    truth[1:5, 1:6, 1:6] = 1
    probabilities = np.zeros((6, 2, 12, 12), np.float32)
    probabilities[1:5, 0, 1:6, 1:6] = 0.9
    probabilities[1:5, 0, 1:6, 6:9] = 0.6
    ct = np.where(truth == 1, 100.0, 0.0).astype(np.float32)
    whole = (slice(0, 6), slice(0, 12), slice(0, 12))
    case = InnerCase("hand", probabilities, whole, truth, voxel_ml=0.001, has_lesions=False, spacing_mm=(1.0, 1.0, 1.0), ct=ct)
    card = ModelCard(input_size=12)
    strong, weak = {"smoothness": 10.0, "contrast_hu": 10.0}, {"smoothness": 0.001, "contrast_hu": 10.0}
    assert mean_inner_liver_dice([case], card) == mean_inner_liver_dice([case], with_graph_cut(card, weak)) == 200 / 260
    assert mean_inner_liver_dice([case], with_graph_cut(card, strong)) == 1.0
    chosen = select_graph_cut([case], card, [weak, strong])
    assert chosen == {"graph_cut": strong, "mean_liver_dice_by_graph_cut": {"none": 200 / 260, "0.001/10": 200 / 260, "10/10": 1.0}}
    assert select_graph_cut([case], card, [weak])["graph_cut"] == {}  # a tie: no cut
    assert select_graph_cut([case], with_graph_cut(card, weak), [weak])["graph_cut"] == weak  # a tie: the card's own
    # The engine's label map, and a card that differs in lesion settings only reuses the cut (cut_outputs).
    from dataclasses import replace

    from LiverSegLib.pipeline import label_map_in_box
    from LiverSegTraining.runner import inner_label_map

    cut_card = with_graph_cut(card, strong)
    box, engine = label_map_in_box(probabilities, whole, cut_card, 0.001, ct_canonical=ct, spacing_mm=(1.0, 1.0, 1.0))
    first = inner_label_map(case, cut_card)
    assert np.array_equal(first[box], engine) and np.count_nonzero(first) == 100
    cached = case.cut_cache["probabilities"]
    assert np.array_equal(inner_label_map(case, replace(cut_card, min_lesion_ml=0.5)), first) and case.cut_cache["probabilities"] is cached


def test_inner_cases_keep_what_their_cuts_read():
    """Inner cases keep the CT where any stage's cut (or a lesion rule) reads it, and stage 1's probabilities
    where stage 1's liver is cut or a cut is to be chosen: a cascade with stage 2's cut alone needs the CT."""
    from conftest import PROJECT_ROOT

    from LiverSegTraining.runner import judges_cuts, reads_ct

    recipe = PROJECT_ROOT / "LiverSegTraining/configs/cascade.toml"
    no_rules = ["lesion.rule_sigmas_mm=[]", "lesion.rule_erodes_mm=[]", "lesion.rule_k_mads=[]"]
    stage2_cut_only = load_config(recipe, [*no_rules, "model.graph_cut={}", "graph_cuts={}"])
    no_cut = load_config(recipe, [*no_rules, "model.graph_cut={}", "graph_cuts={}", "stage2.model.graph_cut={}"])
    assert judges_cuts(load_config(recipe)) and reads_ct(load_config(recipe))
    assert not judges_cuts(stage2_cut_only) and reads_ct(stage2_cut_only)
    assert not judges_cuts(no_cut) and not reads_ct(no_cut)
    assert judges_cuts(load_config(recipe, [*no_rules, "model.graph_cut={}"]))  # cut candidates: stage 1's


def _small_expert_cases(data_root, folder):
    """The small weak-label volumes under names the case reader takes for expert labels, so that nested
    cross-validation runs in seconds; small_a gets a 27-voxel lesion inside its liver (a lesion case)."""
    import json

    import numpy as np
    import SimpleITK as sitk

    sources = {"small_a": "totalseg_example_sm_MODEL", "small_b": "dcmqi_ct3slice", "small_c": "totalseg_example_dicom_MODEL"}
    for name, source in sources.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "ct.nii.gz").symlink_to(data_root / "cases" / source / "ct.nii.gz")
        label_image = sitk.ReadImage(str(data_root / "cases" / source / "label.nii.gz"))
        if name == "small_a":
            label = sitk.GetArrayFromImage(label_image)
            k, j, i = np.argwhere(label == 1)[len(np.argwhere(label == 1)) // 2]
            label[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = np.where(label[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] == 1, 2, 0)
            labelled = sitk.GetImageFromArray(label)
            labelled.CopyInformation(label_image)
            label_image = labelled
            (folder / name / "stats.json").write_text(json.dumps({"lesion_labelled": True}), encoding="utf-8")
        sitk.WriteImage(label_image, str(folder / name / "label.nii.gz"))
    return list(sources)


def test_lesion_settings_chosen_on_inner_folds_without_the_test_patient(data_root, tmp_path, caplog):
    """Nested cross-validation (lesion.selection = "inner") on three small cases: the fold that tests
    small_a chooses its lesion settings from the grid on inner folds over small_b and small_c only and
    records them in its row and RESULTS.md; the final model's card carries settings chosen on inner folds
    over all three training patients. Each set of patients is trained once in the run: the fold testing
    small_b reuses the network of small_a's inner fold that holds out small_b (both train on small_c
    alone), and the final model's inner folds holding out small_a and small_b are those outer folds."""
    from LiverSegLib.model import read_card
    from LiverSegTraining.runner import LESION_SELECTION_RULE, crossvalidate, train_final, write_results

    names = _small_expert_cases(data_root, tmp_path / "cases")
    overrides = tiny_config(tmp_path, data_root, [f"data=[{{layout = 'cases', path = '{tmp_path / 'cases'}'}}]", "split.weak_train=[]",
                                                  "split.val=[]", "split.exclude=[]", "lesion.selection='inner'",
                                                  "lesion.rule_sigmas_mm=[1.5]", "lesion.rule_erodes_mm=[2.0]", "lesion.rule_k_mads=[3.0]",
                                                  "graph_cuts={smoothness=[64.0], contrast_hu=[10.0]}"])
    config = load_config(None, overrides)
    assert config.graph_cut_candidates() == [{"smoothness": 64.0, "contrast_hu": 10.0}]
    trainings = {}
    rows, summary = crossvalidate(config, tmp_path / "cv", folds=["small_a", "small_b"], trainings=trainings)
    grid = config.lesion
    assert rows[0]["graph_cut"] in ("none", "64/10")
    assert [r["case"] for r in rows] == ["small_a", "small_b"]
    assert rows[0]["lesion_chosen_on"].split() == ["small_b", "small_c"] == rows[0]["trained_on"].split()
    assert rows[1]["lesion_chosen_on"].split() == ["small_a", "small_c"] == rows[1]["trained_on"].split()
    assert rows[0]["lesion_threshold"] in grid.thresholds and rows[0]["min_lesion_ml"] in grid.min_sizes_ml
    trained = sorted(str(path.parent.relative_to(tmp_path)) for path in tmp_path.glob("**/history.json"))
    assert trained == ["cv/fold_small_a", "cv/fold_small_a/inner_small_b", "cv/fold_small_a/inner_small_c", "cv/fold_small_b",
                       "cv/fold_small_b/inner_small_c"]
    assert [names for _, names, _ in trainings] == [("small_c",), ("small_b",), ("small_b", "small_c"), ("small_a",), ("small_a", "small_c")]
    # Started again with --resume: each fold's settings and rows are read back, not chosen or evaluated anew, and
    # its networks (loaded from their checkpoints) still join the record that later folds and the final model reuse.
    caplog.set_level(logging.INFO, logger="LiverSegTraining")
    trainings_again = {}
    rows_again, summary_again = crossvalidate(config, tmp_path / "cv", resume=True, folds=["small_a", "small_b"], trainings=trainings_again)
    as_text = lambda value: json.dumps(value, sort_keys=True, default=lambda item: item.item())  # NaN as NaN, numpy scalars as Python's
    assert as_text(rows_again) == as_text(rows) and as_text(summary_again) == as_text(summary)
    assert list(trainings_again) == list(trainings)
    assert caplog.text.count("before this start") == 4  # two choices of settings, two folds' rows
    assert sorted(str(path.parent.relative_to(tmp_path)) for path in tmp_path.glob("**/history.json")) == trained
    write_results(rows, summary, tmp_path / "cv" / "RESULTS.md", "test")
    results = (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")
    assert LESION_SELECTION_RULE in results and "| lesion_threshold | min_lesion_ml | graph_cut | lesion_source | lesion_chosen_on |" in results
    # Each fold's inner choice with every candidate's figure: the cut's "none" and "64/10" for the fold of small_a.
    assert [choice["fold"] for choice in summary["inner_choices"]] == ["small_a", "small_b"]
    dice_by_cut = summary["inner_choices"][0]["mean_liver_dice_by_graph_cut"]
    assert f"| — | small_a | small_b small_c | — | {rows[0]['graph_cut']} (none: {dice_by_cut['none']:.4f}, 64/10: {dice_by_cut['64/10']:.4f}) | " in results

    card = read_card(train_final(config, tmp_path / "final", {"summary": summary}, trainings=trainings))
    trained_now = sorted(str(path.parent.relative_to(tmp_path)) for path in tmp_path.glob("final/**/history.json"))
    assert trained_now == ["final/final", "final/final/inner_small_c"]  # inner folds without small_a, small_b: the outer folds'
    assert len(trainings) == 7
    selection = card.training["lesion_selection"]
    assert selection["chosen_on"] == names
    assert (card.lesion_threshold, card.min_lesion_ml, card.lesion_rule) == (selection["lesion_threshold"], selection["min_lesion_ml"], selection["lesion_rule"])
    assert card.min_lesion_ml in grid.min_sizes_ml and card.lesion_rule in ({}, {"sigma_mm": 1.5, "erode_mm": 2.0, "k_mad": 3.0})
    assert card.lesion_threshold in grid.thresholds or card.lesion_rule
    assert selection["grid"]["rule_k_mads"] == [3.0] and selection["grid"]["graph_cuts"] == {"smoothness": [64.0], "contrast_hu": [10.0]}
    assert card.graph_cut == selection["graph_cut"] and set(selection["mean_liver_dice_by_graph_cut"]) == {"none", "64/10"}


def test_cascade_gate_margin_chosen_on_inner_folds(data_root, tmp_path):
    """A cascade with ``[stage2] gate_margins_mm`` under nested cross-validation: the fold that tests small_a
    chooses its gate margin (and lesion settings) on inner folds over small_b and small_c, records it in its
    row and RESULTS.md, and is judged with a card that carries it."""
    from LiverSegLib.errors import LiverSegInputError
    from LiverSegTraining.runner import crossvalidate, write_results

    _small_expert_cases(data_root, tmp_path / "cases")
    overrides = tiny_config(tmp_path, data_root, [f"data=[{{layout = 'cases', path = '{tmp_path / 'cases'}'}}]", "split.weak_train=[]",
                                                  "split.val=[]", "split.exclude=[]", "lesion.selection='inner'",
                                                  "stage2={model={input_size=64, crop_margin_mm=15.0}, gate_margins_mm=[0.0, 15.0]}"])
    config = load_config(None, overrides)
    assert config.gate_margins_mm() == [0.0, 15.0]
    rows, summary = crossvalidate(config, tmp_path / "cv", folds=["small_a"])
    assert rows[0]["gate_margin_mm"] in (0.0, 15.0) and rows[0]["lesion_chosen_on"].split() == ["small_b", "small_c"]
    assert sorted(p.parent.parent.name for p in (tmp_path / "cv" / "fold_small_a").glob("inner_*/stage2/best.pt")) == ["inner_small_b", "inner_small_c"]
    write_results(rows, summary, tmp_path / "cv" / "RESULTS.md", "test")
    results = (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")
    assert "`gate_margin_mm`" in results and "| gate_margin_mm |" in results
    with pytest.raises(LiverSegInputError, match="gate_margins_mm must be 0 or above"):
        load_config(None, [*overrides[:-1], "stage2={model={input_size=64, crop_margin_mm=15.0}, gate_margins_mm=[-1.0]}"])
    with pytest.raises(LiverSegInputError, match="given together"):
        load_config(None, [*overrides, "lesion.rule_sigmas_mm=[1.5]", "lesion.rule_k_mads=[3.0]"])
    with pytest.raises(LiverSegInputError, match="k_mad above 0"):
        load_config(None, [*overrides, "lesion.rule_sigmas_mm=[1.5]", "lesion.rule_erodes_mm=[2.0]", "lesion.rule_k_mads=[0.0]"])
    with pytest.raises(LiverSegInputError, match=r"\[model\] model card's lesion_rule needs exactly"):
        load_config(None, [*overrides, "model.lesion_rule={sigma_mm=1.5}"])
    with pytest.raises(LiverSegInputError, match=r"\[graph_cuts\] model card's graph_cut needs numbers above 0"):
        load_config(None, [*overrides, "graph_cuts={smoothness=[0.0], contrast_hu=[10.0]}"])
    with pytest.raises(LiverSegInputError, match="needs two non-empty lists"):
        load_config(None, [*overrides, "graph_cuts={smoothness=[64.0]}"])


def test_folds_and_seeds_side_by_side_then_one_resumed_table(data_root, tmp_path):
    """README's side-by-side recipe: two processes (seeds 0 and 1 of the fold that holds out small_a) train at
    once on one shared cache; a later run over both seeds with --resume trains nothing again and tables both
    seeds' rows, each as its own process measured it."""
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    _small_expert_cases(data_root, tmp_path / "cases")
    sets = []
    for override in tiny_config(tmp_path, data_root, [f"data=[{{layout = 'cases', path = '{tmp_path / 'cases'}'}}]", "split.weak_train=[]",
                                                      "split.val=[]", "split.exclude=[]"]):
        sets += ["--set", override]
    config_path, output = str(PROJECT_ROOT / "LiverSegTraining/configs/bundled.toml"), tmp_path / "cv"
    script = "import sys; from LiverSegTraining.cli import train_main; raise SystemExit(train_main(sys.argv[1:]))"
    processes = [subprocess.Popen([sys.executable, "-c", script, config_path, "--crossval", "--seeds", str(seed), "--folds", "small_a",
                                   "--output", str(output / f"seed_{seed}"), *sets]) for seed in (0, 1)]
    assert [process.wait(timeout=900) for process in processes] == [0, 0]
    alone = {seed: read_strict_json(output / f"seed_{seed}" / "crossval.json") for seed in (0, 1)}
    checkpoints = {path: path.stat().st_mtime_ns for path in output.glob("seed_*/fold_small_a/*.pt")}
    assert len(checkpoints) == 4
    assert train_main([config_path, "--crossval", "--seeds", "0,1", "--folds", "small_a", "--resume", "--output", str(output), *sets]) == 0
    assert {path: path.stat().st_mtime_ns for path in output.glob("seed_*/fold_small_a/*.pt")} == checkpoints  # nothing trained again
    rows = read_strict_json(output / "crossval.json")
    assert [(row["seed"], row["case"]) for row in rows] == [(0, "small_a"), (1, "small_a")]
    assert [row["liver_dice"] for row in rows] == [alone[0][0]["liver_dice"], alone[1][0]["liver_dice"]]
    assert alone[0][0]["liver_dice"] != alone[1][0]["liver_dice"]  # two trainings, not one twice


def test_inner_selection_needs_two_training_patients_and_a_known_mode(data_root, tmp_path):
    import pytest

    from LiverSegLib.errors import LiverSegInputError
    from LiverSegTraining.runner import choose_lesion_settings, load_cases

    with pytest.raises(LiverSegInputError, match="lesion.selection"):
        load_config(None, tiny_config(tmp_path, data_root, ["lesion.selection='best'"]))
    config = load_config(None, tiny_config(tmp_path, data_root, ["split.weak_train=['dcmqi_ct3slice']"]))
    with pytest.raises(LiverSegInputError, match="two training patients"):
        choose_lesion_settings(config, load_cases(config), tmp_path / "inner", resume=False)


def test_run_records_read_back_only_under_their_key_when_resuming(tmp_path):
    """A fold's stored rows (strict JSON) come back as written (NaN, None, numpy scalars as Python's) only with --resume and
    only for the same settings and patients: another seed, another pool or another held-out patient, and the
    fold is evaluated again."""
    import math
    from dataclasses import replace

    import numpy as np

    from LiverSegTraining.runner import read_run_record, run_record_key, write_run_record
    from LiverSegTraining.sources import Case

    config = load_config(None, [])
    cases = [Case(name, name, "test", label, False, "n/a", lambda: None) for name, label in (("a", "expert"), ("b", "expert"), ("c", "model"))]
    key = run_record_key(config, cases, cases[0])
    path = tmp_path / "fold_rows.json"
    write_run_record(path, key, {"rows": [{"liver_dice": np.float32(0.5), "lesion_dice": float("nan"), "lesion_true_count": np.int64(3),
                                           "lesion_assd_mm": None, "lesion_hd95_mm": float("inf")}]})
    json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda token: pytest.fail(f"not strict JSON: {token}"))
    row = read_run_record(path, key, resume=True)["rows"][0]
    assert row["liver_dice"] == 0.5 and math.isnan(row["lesion_dice"]) and row["lesion_true_count"] == 3 and type(row["lesion_true_count"]) is int
    assert row["lesion_assd_mm"] is None and row["lesion_hd95_mm"] == float("inf")  # not measured stays apart from not applicable
    with pytest.raises(TypeError, match="cannot hold PosixPath"):
        write_run_record(tmp_path / "other.json", key, {"rows": [{"folder": tmp_path}]})
    assert read_run_record(path, key, resume=False) is None
    assert read_run_record(tmp_path / "none.json", key, resume=True) is None
    for other in (run_record_key(replace(config, seed=1), cases, cases[0]), run_record_key(config, cases[:2], cases[0]),
                  run_record_key(config, cases, cases[1])):
        assert read_run_record(path, other, resume=True) is None
    assert not list(tmp_path.glob(".fold_rows.json*"))  # written atomically: no temporary left


def test_seed_spread_and_table_by_hand():
    """Two seeds × two cases: per-seed mean liver Dice 0.90 and 0.80 → SD 0.0707…, range 0.10; the table
    gives each case's mean ± SD (lowest–highest); the lesion rule takes each case's mean over the seeds."""
    from LiverSegTraining.runner import format_seed_table, lesions_validated, seed_spread

    nan = float("nan")
    rows = [
        {"case": "a", "label": "expert", "seed": 0, "liver_dice": 0.95, "lesion_dice": 0.6},
        {"case": "b", "label": "expert", "seed": 0, "liver_dice": 0.85, "lesion_dice": nan},
        {"case": "a", "label": "expert", "seed": 1, "liver_dice": 0.85, "lesion_dice": 0.3},
        {"case": "b", "label": "expert", "seed": 1, "liver_dice": 0.75, "lesion_dice": nan},
        {"case": "v", "label": "model", "seed": 1, "liver_dice": 0.10, "lesion_dice": 0.0},  # never in the spread or the rule
    ]
    spread = seed_spread(rows)
    assert spread["seed_sd_mean_liver_dice"] == pytest.approx(0.1 / 2**0.5)
    assert spread["seed_range_mean_liver_dice"] == pytest.approx(0.1)
    assert spread["seed_range_mean_lesion_dice"] == pytest.approx(0.3)
    table = format_seed_table(rows)
    assert "| a | 2 | 0.900 ± 0.071 (0.850–0.950) |" in table and "| b | 2 | 0.800 ± 0.071 (0.750–0.850) |" in table
    assert "| v | 1 | 0.100 ± nan (0.100–0.100) |" in table
    assert not lesions_validated(rows)  # case a: mean lesion Dice 0.45
    rows[2]["lesion_dice"] = 0.45
    assert lesions_validated(rows)  # 0.525, although one training gave 0.45


def test_crossval_over_seeds(data_root, tmp_path):
    """--seeds 0,1 trains each fold twice into seed_N folders; rows carry their seed; RESULTS.md has the
    per-case table over the seeds and the summary the spread between them."""
    from LiverSegTraining.cli import train_main

    _small_expert_cases(data_root, tmp_path / "cases")
    argv = ["--crossval", "--folds", "small_a", "--seeds", "0,1", "--output", str(tmp_path / "cv")]
    for override in tiny_config(tmp_path, data_root, [f"data=[{{layout = 'cases', path = '{tmp_path / 'cases'}'}}]", "split.weak_train=[]",
                                                      "split.val=[]", "split.exclude=[]"]):
        argv += ["--set", override]
    config_path = str(Path(__file__).resolve().parent.parent / "LiverSegTraining" / "configs" / "bundled.toml")
    assert train_main([config_path, *argv]) == 0
    assert (tmp_path / "cv" / "seed_0" / "fold_small_a").is_dir() and (tmp_path / "cv" / "seed_1" / "fold_small_a").is_dir()
    import csv

    with open(tmp_path / "cv" / "crossval.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["case"], r["seed"]) for r in rows] == [("small_a", "0"), ("small_a", "1")]
    assert rows[0]["liver_dice"] != rows[1]["liver_dice"]  # two trainings, two results
    results = (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")
    assert "trained 2 times, with seeds 0, 1" in results and "| small_a | 2 |" in results and "seed_sd_mean_liver_dice" in results
    assert train_main([config_path, "--seeds", "0,0", "--crossval"]) == 2
    assert train_main([config_path, "--seeds", "1"]) == 2  # --seeds needs --crossval


def test_thick_slice_scan_by_hand():
    """Four 2 mm slices of 0, 10, 20, 30 HU labelled background, liver, background, lesion. As 4 mm slices: two
    slabs of two slices (means 5 and 25 HU; liver 0.5 and 0.5, lesion 0 and 0.5: liver, then lesion), centred
    1 mm past the first slice's centre. As 3 mm slices (1.5 native slices a slab): the first covers slice 0
    and half of slice 1 (weights 2/3, 1/3: 3.3 HU, liver 1/3: background), the second the other half of slice 1
    and slice 2 (16.7 HU, liver 1/3), the rest (slice 3) is thinner than a slab and dropped; centres 0.5 mm and
    3.5 mm past the first slice's."""
    import numpy as np
    import SimpleITK as sitk

    from LiverSegLib.errors import LiverSegInputError
    from LiverSegTraining.runner import thick_slice_figures, thick_slice_scan

    ct = sitk.GetImageFromArray(np.broadcast_to(np.array([0, 10, 20, 30], np.int16)[:, None, None], (4, 2, 3)).copy())
    ct.SetSpacing((0.7, 0.8, 2.0))
    ct.SetOrigin((1.0, 2.0, 3.0))
    ct.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1))  # the third axis runs towards −z
    truth = np.broadcast_to(np.array([0, 1, 0, 2], np.uint8)[:, None, None], (4, 2, 3)).copy()

    thick, thick_truth = thick_slice_scan(ct, truth, 4.0)
    assert sitk.GetArrayFromImage(thick)[:, 0, 0].tolist() == [5, 25] and thick.GetSpacing() == pytest.approx((0.7, 0.8, 4.0))
    assert thick_truth[:, 0, 0].tolist() == [1, 2] and thick.GetOrigin() == pytest.approx((1.0, 2.0, 2.0))
    assert thick.GetDirection() == ct.GetDirection() and sitk.GetArrayFromImage(thick).dtype == np.int16

    thick, thick_truth = thick_slice_scan(ct, truth, 3.0)
    assert sitk.GetArrayFromImage(thick)[:, 1, 2].tolist() == [3, 17] and thick_truth[:, 1, 2].tolist() == [0, 0]
    assert thick.GetOrigin() == pytest.approx((1.0, 2.0, 2.5)) and thick.GetSpacing()[2] == pytest.approx(3.0)
    with pytest.raises(LiverSegInputError, match="thinner than the scan"):
        thick_slice_scan(ct, truth, 1.0)
    with pytest.raises(LiverSegInputError, match="shorter than one slice of 10.0 mm"):
        thick_slice_scan(ct, truth, 10.0)
    # A scan of 5 mm slices, or one 4 mm long, has no 5 mm figures (and no error: a cross-validation goes on).
    for spacing_mm in ((0.7, 0.8, 5.0), (0.7, 0.8, 1.0)):
        ct.SetSpacing(spacing_mm)
        assert thick_slice_figures(None, ct, truth, lesion_labelled=True) == {}


def test_other_scanner_figures_of_the_bundled_model_on_ircad_01(data_root):
    """The bundled model (which trained on ircad_01: behaviour, not accuracy) on ircad_01 as other scanners
    give it. Cut scan: the liver spans slices 27–124, so slices 76 on are kept (the middle liver slice).
    Smaller field of view: columns and rows 77–435 of 512 (the central 70 %). Each whole-scan figure is the
    Dice of the whole prediction on the kept region, by hand, and the cut scan is segmented about as well.
    Thick slices: 129 slices of 1.6 mm as 41 of 5 mm, the liver's volume kept within 1 %, segmented about as
    well as the native slices."""
    import numpy as np
    import SimpleITK as sitk

    from LiverSegLib.pipeline import LiverSegmenter
    from LiverSegTraining.metrics import overlap
    from LiverSegTraining.runner import cut_scan_figures, small_fov_figures, thick_slice_figures, thick_slice_scan

    ct = sitk.ReadImage(str(data_root / "cases" / "ircad_01" / "ct.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root / "cases" / "ircad_01" / "label.nii.gz")))
    segmenter = LiverSegmenter(device="cpu")
    prediction = sitk.GetArrayFromImage(segmenter.segment(ct).label_image)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    figures = cut_scan_figures(segmenter, ct, truth, prediction)
    assert figures["liver_dice_cut_scan_whole"] == pytest.approx(dice(prediction[76:] >= 1, truth[76:] >= 1))
    assert figures["liver_dice_cut_scan"] >= figures["liver_dice_cut_scan_whole"] - 0.02, figures

    figures = small_fov_figures(segmenter, ct, truth, prediction)
    assert figures["liver_dice_small_fov_whole"] == pytest.approx(dice(prediction[:, 77:435, 77:435] >= 1, truth[:, 77:435, 77:435] >= 1))
    assert figures["liver_dice_small_fov"] >= figures["liver_dice_small_fov_whole"] - 0.03, figures

    thick, thick_truth = thick_slice_scan(ct, truth, 5.0)
    assert thick.GetSize() == (512, 512, 41)
    liver_ml, thick_liver_ml = (truth >= 1).sum() * np.prod(ct.GetSpacing()) / 1000, (thick_truth >= 1).sum() * np.prod(thick.GetSpacing()) / 1000
    assert thick_liver_ml == pytest.approx(liver_ml, rel=0.01)
    figures = thick_slice_figures(segmenter, ct, truth, lesion_labelled=True)
    thick_prediction = sitk.GetArrayFromImage(segmenter.segment(thick).label_image)
    assert figures["liver_dice_thick_slices"] == pytest.approx(dice(thick_prediction >= 1, thick_truth >= 1))
    assert figures["liver_dice_thick_slices"] >= overlap(prediction >= 1, truth >= 1)["dice"] - 0.03, figures
    assert 0.0 <= figures["lesion_dice_thick_slices"] <= 1.0


def test_int8_calibration_root_is_the_folder_holding_every_training_case(tmp_path):
    """The export writes int8 graphs only where ``export_int8_graph`` finds every training case as
    ``ROOT/cases/NAME/ct.nii.gz``: a ``cases`` source in a folder named ``cases``; else none (a warning)."""
    from LiverSegTraining.runner import int8_calibration_root
    from LiverSegTraining.sources import Case

    for folder in (tmp_path / "cases", tmp_path / "mine"):
        for name in ("a", "b"):
            (folder / name).mkdir(parents=True)
            (folder / name / "ct.nii.gz").write_bytes(b"")
    cases = [Case(name, name, "", "expert", False, "", load=lambda: None) for name in ("a", "b")]
    in_cases = load_config(None, [f"data=[{{layout = 'ircad', path = '{tmp_path}'}}, {{layout = 'cases', path = '{tmp_path / 'cases'}'}}]"])
    assert int8_calibration_root(in_cases, cases) == tmp_path
    other_name = load_config(None, [f"data=[{{layout = 'cases', path = '{tmp_path / 'mine'}'}}]"])
    assert int8_calibration_root(other_name, cases) is None
    missing = [*cases, Case("c", "c", "", "expert", False, "", load=lambda: None)]
    assert int8_calibration_root(in_cases, missing) is None
