"""Training plots (LiverSegTraining/plots.py) and strict JSON (LiverSegLib/outputs.py, which training writes with): curves that
were never measured are left out instead of drawn empty, and NaN is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from LiverSegLib.outputs import nan_as_null, write_strict_json
from LiverSegTraining.plots import _measured, plot_history
from LiverSegTraining.train import EpochRecord

NAN = float("nan")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def read_strict_json(path: Path) -> Any:
    """Load ``path`` as a strict reader would (jq, JavaScript): NaN and Infinity are refused."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)


def test_strict_json_writes_null_for_nan_at_any_depth(tmp_path):
    value = {"dice": NAN, "rows": [{"hd95_mm": math.inf, "case": "a"}, (1.0, -math.inf)], "n": 3}
    assert nan_as_null(value) == {"dice": None, "rows": [{"hd95_mm": None, "case": "a"}, [1.0, None]], "n": 3}
    assert read_strict_json(write_strict_json(value, tmp_path / "value.json"))["rows"][1] == [1.0, None]
    with pytest.raises(ValueError):
        json.loads(json.dumps(value), parse_constant=_refuse_constant)  # what plain json.dumps wrote before


def test_plot_history_leaves_out_curves_never_measured(tmp_path):
    """Without validation cases or lesion labels, dice.png shows the training liver curve only."""
    history = [EpochRecord(c, e, 1.0 - 0.1 * i, NAN, NAN, 1e-3 if e == 0 else 5e-4, 1.0, 0.3 + 0.1 * i, NAN) for i, (c, e) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])]
    series = {"train liver": [r.train_liver_dice for r in history], "val liver": [r.val_liver_dice for r in history]}
    assert list(_measured(series)) == ["train liver"]
    paths = plot_history(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "dice.png", "lr.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
