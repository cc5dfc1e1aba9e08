"""Cross-validation by patient (LiverSegTraining/runner.py) on the real expert cases: each fold tests on
the patient it did not train on, and ``--folds`` restricts the held-out cases."""

from __future__ import annotations

from LiverSegTraining.cli import train_main
from LiverSegTraining.config import load_config

from conftest import tiny_config
from test_plots import read_strict_json


def test_cross_validation_by_patient(data_root, tmp_path):
    """Leave-one-patient-out over two expert cases: each fold tests on the patient it did not train on."""
    from LiverSegTraining.runner import crossvalidate

    overrides = tiny_config(tmp_path, data_root, ["split.exclude=['ircad_07']", "split.weak_train=[]", "split.val=[]"])
    config = load_config(None, overrides)
    rows, summary = crossvalidate(config, tmp_path / "cv")
    assert [r["case"] for r in rows] == ["ircad_01", "ircad_17"]
    assert [r["trained_on"] for r in rows] == ["ircad_17", "ircad_01"]
    assert all(0.0 <= r["liver_dice"] <= 1.0 and "lesion_dice" in r for r in rows)
    # Per-lesion detection on every fold (ircad_01 has 7 tumours, ircad_17 has 2).
    assert [r["lesion_true_count"] for r in rows] == [7, 2]
    assert all(0 <= r["lesion_detected_count"] <= r["lesion_true_count"] and r["lesion_false_count"] >= 0 for r in rows)
    assert (tmp_path / "cv" / "crossval.csv").read_text(encoding="utf-8").count("\n") == 3
    assert [r["case"] for r in read_strict_json(tmp_path / "cv" / "crossval.json")] == ["ircad_01", "ircad_17"]
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
    assert "| ircad_17 |" in results and "| lesion_recall | lesion_false_count | lesion_false_ml |" in results
    assert train_main([config_path, *argv[:2], "ircad_99", *argv[3:]]) == 2
    assert "ircad_99" in capsys.readouterr().err
    assert train_main([config_path, "--folds", "ircad_17"]) == 2
