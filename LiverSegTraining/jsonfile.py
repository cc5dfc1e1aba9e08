"""Strict JSON for the files training writes (history, cross-validation tables).

Python's ``json`` writes NaN and Infinity by default, which jq, JavaScript and many JSON libraries refuse;
a figure that was never measured is written as ``null`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def nan_as_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±Infinity), at any depth, replaced by None.

    A round trip through ``json``: its encoder writes the non-finite floats as the tokens NaN, Infinity and
    -Infinity, exactly the ones ``parse_constant`` is called for, so nothing else can be turned into None.
    """
    return json.loads(json.dumps(value), parse_constant=lambda _token: None)


def write_strict_json(value: Any, path: Path) -> Path:
    """Write ``value`` as indented strict JSON; ``allow_nan=False`` makes a missed non-finite value an error."""
    path.write_text(json.dumps(nan_as_null(value), indent=1, allow_nan=False), encoding="utf-8")
    return path


__all__ = ["nan_as_null", "write_strict_json"]
