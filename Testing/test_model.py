"""The bundled model: its card, its integrity check, and the pipeline's Dice on the expert volumes.

The expert volumes are in the bundled model's training set, so this checks the pipeline end to end;
the honest accuracy is the cross-validation stored in the card (checked below to be there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import ModelIntegrityError
from LiverSegLib.model import BUNDLED_CARD, CARD_SCHEMA_VERSION, ModelCard, read_card, sha256_of

from conftest import EXPERT_CASES, read_case


def test_bundled_card_matches_its_weights():
    card = read_card(BUNDLED_CARD)
    weights = BUNDLED_CARD.parent / card.weights_file
    assert card.schema_version == CARD_SCHEMA_VERSION
    assert sha256_of(weights) == card.weights_sha256
    assert weights.stat().st_size < 60 * 1024 * 1024


def test_card_schema_is_enforced(tmp_path):
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    with pytest.raises(ModelIntegrityError, match="unknown fields"):
        ModelCard.from_dict({**data, "surprise": 1})
    with pytest.raises(ModelIntegrityError, match="schema"):
        ModelCard.from_dict({**data, "schema_version": 99})


def test_card_documents_data_licences_command_and_cross_validation():
    card = read_card(BUNDLED_CARD)
    assert card.training["command"].startswith("liverseg-train")
    assert all(entry["licence"] for entry in card.training["cases"])
    labels = {entry["case"]: entry["label"] for entry in card.training["cases"]}
    assert set(EXPERT_CASES) <= {case for case, label in labels.items() if label == "expert"}
    # Model-made labels may only train as marked weak data, never as experts.
    assert all(label == "model" for case, label in labels.items() if case.endswith("_MODEL"))
    rows = {row["case"]: row for row in card.evaluation["per_case"]}
    assert set(EXPERT_CASES) <= set(rows), "every expert case needs its cross-validated row"
    for name in EXPERT_CASES:
        assert name not in rows[name]["trained_on"].split(), "a fold was tested on its own training case"
        assert 0 <= rows[name]["liver_dice"] <= 1
    assert "lesion_dice" not in rows["ircad_07"]  # liver-only label: no lesion figure
    assert card.lesions_validated == (min(rows[n]["lesion_dice"] for n in ("ircad_01", "ircad_17")) >= 0.5)


def test_bundled_card_is_strict_json_and_nan_is_written_as_null(tmp_path):
    def refuse(constant: str):
        raise ValueError(f"{constant} in the model card")

    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"), parse_constant=refuse)
    card = ModelCard.from_dict(data)
    card.training = {**card.training, "best_val_liver_dice_model_grid": float("nan"), "per_case": [{"dice": float("nan")}]}
    written = json.loads(card.to_json(), parse_constant=refuse)
    assert written["training"]["best_val_liver_dice_model_grid"] is None
    assert written["training"]["per_case"] == [{"dice": None}]


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_pipeline_check_on_training_patients_not_accuracy(data_root, segmenter, case):
    """A pipeline check, not an accuracy figure: the bundled model was trained on these three patients, so
    a Dice here only shows that reading, preprocessing, the network and the mapping back work end to end.
    Accuracy is the cross-validation in the model card (test above)."""
    ct, label = read_case(data_root, case)
    result = segmenter.segment(ct)
    prediction = sitk.GetArrayViewFromImage(result.label_image) >= 1
    truth = sitk.GetArrayViewFromImage(label) >= 1
    dice = 2 * np.count_nonzero(prediction & truth) / (prediction.sum() + truth.sum())
    assert dice >= 0.90, f"{case}: liver Dice {dice:.3f}"
    true_ml = truth.sum() * np.prod(ct.GetSpacing()) / 1000
    assert result.liver_ml == pytest.approx(true_ml, rel=0.15)


def test_cards_without_lesion_settings_use_the_card_threshold_and_keep_every_lesion():
    """Cards written before the lesion settings load with the card's threshold for lesions and no
    minimum size (the behaviour they were validated with); set, the lesion channel has its own."""
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    data.pop("lesion_threshold", None)
    data.pop("min_lesion_ml", None)
    card = ModelCard.from_dict(data)
    assert card.lesion_threshold is None and card.min_lesion_ml == 0.0
    assert card.channel_thresholds() == (card.threshold, card.threshold)
    tuned = ModelCard.from_dict({**data, "lesion_threshold": 0.7, "min_lesion_ml": 0.5})
    assert tuned.channel_thresholds() == (tuned.threshold, 0.7) and tuned.min_lesion_ml == 0.5
    assert read_card(BUNDLED_CARD).channel_thresholds() == (read_card(BUNDLED_CARD).threshold,) * 2


@pytest.mark.parametrize(
    "rule, problem",
    [({"sigma_mm": 1.5, "erode_mm": 5.0}, "needs exactly"),
     ({"sigma_mm": 1.5, "erode_mm": 5.0, "k_mad": 3.0, "extra": 1.0}, "needs exactly"),
     ({"sigma_mm": 1.5, "erode_mm": -1.0, "k_mad": 3.0}, "numbers of 0 or more"),
     ({"sigma_mm": 1.5, "erode_mm": 5.0, "k_mad": 0.0}, "k_mad above 0"),
     ({"sigma_mm": "wide", "erode_mm": 5.0, "k_mad": 3.0}, "numbers of 0 or more")],
)
def test_card_lesion_rule_is_checked_when_read(rule, problem):
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    with pytest.raises(ModelIntegrityError, match=problem):
        ModelCard.from_dict({**data, "lesion_rule": rule})


def test_a_card_with_a_lesion_rule_keeps_the_organ_and_takes_its_lesions_from_the_ct(data_root, tmp_path, model_cache):
    """A card of one's own with a ``lesion_rule`` beside the bundled weights: the same organ (label ≥ 1) as the
    bundled card, lesions only inside it, and exactly the voxels the rule marks in that organ."""
    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.pipeline import LiverSegmenter
    from LiverSegLib.postprocessing import darker_than_liver, label_components

    for name in ("liverseg.safetensors", "liverseg.onnx", "liverseg.int8.onnx"):
        (tmp_path / name).symlink_to(BUNDLED_CARD.parent / name)
    rule = {"sigma_mm": 1.5, "erode_mm": 5.0, "k_mad": 3.0}
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    (tmp_path / "card.json").write_text(json.dumps({**data, "lesion_rule": rule}), encoding="utf-8")
    ct = read_case(data_root, "ircad_17")[0]
    plain = sitk.GetArrayFromImage(LiverSegmenter(device="cpu").segment(ct).label_image)
    result = LiverSegmenter(tmp_path / "card.json", device="cpu").segment(ct)
    ruled = sitk.GetArrayFromImage(result.label_image)
    assert np.array_equal(plain >= 1, ruled >= 1)
    transform = canonical_transform(ct.GetDirection())
    organ = transform.to_canonical(ruled >= 1)
    expected = darker_than_liver(transform.to_canonical(sitk.GetArrayFromImage(ct)), organ, transform.canonical_spacing_mm(ct.GetSpacing()), **rule)
    assert np.array_equal(transform.to_canonical(ruled == 2), expected)
    assert np.count_nonzero(expected) > 0 and result.lesion_count == label_components(expected, fully_connected=True)[1]  # the report counts them


@pytest.mark.parametrize(
    "settings, problem",
    [({"smoothness": 128.0}, "needs exactly"),
     ({"smoothness": 128.0, "contrast_hu": 10.0, "extra": 1.0}, "needs exactly"),
     ({"smoothness": 0.0, "contrast_hu": 10.0}, "numbers above 0"),
     ({"smoothness": 128.0, "contrast_hu": True}, "numbers above 0")],
)
def test_card_graph_cut_is_checked_when_read(settings, problem):
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    with pytest.raises(ModelIntegrityError, match=problem):
        ModelCard.from_dict({**data, "graph_cut": settings})


def test_a_card_with_a_graph_cut_redraws_the_organ_on_the_ct(data_root, tmp_path, model_cache):
    """A card of one's own with a ``graph_cut`` beside the bundled weights, on ircad_07 (a training patient of
    the bundled model: a pipeline check, not accuracy): a cut too weak to move any pixel gives the bundled
    card's label map voxel for voxel; the cut of the cross-fold look (128, 10 HU) changes the organ and stays
    on the expert liver (Dice ≥ 0.90)."""
    from LiverSegLib.pipeline import LiverSegmenter

    for name in ("liverseg.safetensors", "liverseg.onnx", "liverseg.int8.onnx"):
        (tmp_path / name).symlink_to(BUNDLED_CARD.parent / name)
    data = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    ct, label = read_case(data_root, "ircad_07")
    truth = sitk.GetArrayFromImage(label) == 1  # its 'tumour' label lies outside the liver
    plain = sitk.GetArrayFromImage(LiverSegmenter(device="cpu").segment(ct).label_image)
    organs = {}
    for smoothness, contrast_hu in ((1e-3, 10.0), (128.0, 10.0)):
        (tmp_path / "card.json").write_text(json.dumps({**data, "graph_cut": {"smoothness": smoothness, "contrast_hu": contrast_hu}}), encoding="utf-8")
        organs[smoothness] = sitk.GetArrayFromImage(LiverSegmenter(tmp_path / "card.json", device="cpu").segment(ct).label_image)
    dice = lambda first, second: 2 * np.count_nonzero(first & second) / (np.count_nonzero(first) + np.count_nonzero(second))
    assert np.array_equal(organs[1e-3], plain)
    cut = organs[128.0]
    assert dice(cut >= 1, plain >= 1) < 0.999 and dice(cut >= 1, truth) >= 0.90
    print(f"\nircad_07 liver Dice: bundled {dice(plain >= 1, truth):.4f}, with the cut {dice(cut >= 1, truth):.4f}")
