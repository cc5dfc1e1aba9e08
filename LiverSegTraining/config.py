"""Training configuration: a TOML file plus ``--set section.key=value`` overrides."""

from __future__ import annotations

import copy
import itertools
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from LiverSegLib.errors import LiverSegInputError, ModelIntegrityError
from LiverSegLib.model import ModelCard, check_graph_cut, check_lesion_rule

from .augment import AugmentConfig
from .losses import LossWeights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ScheduleConfig:
    cycles: int = 4
    epochs_per_cycle: int = 8
    steps_per_epoch: int = 24
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    liver_fraction: float = 0.7
    lesion_fraction: float = 0.0  # share of samples drawn from slices with a labelled lesion (before liver_fraction)
    weak_weight: float = 0.5  # loss weight of samples from model-made / semi-automatic labels
    # bf16 autocast of the network's forward pass (the loss and the weights stay float32); on a GPU also the
    # channels-last layout and cuDNN's autotuner. Off: every recipe's figures were trained without it.
    mixed_precision: bool = False


@dataclass
class SplitConfig:
    val: list[str] = field(default_factory=list)  # never trained on: validation curve, panels, checkpoint selection
    select_on_val: bool = True  # false: validation only monitors (labels too weak to choose by); the last epoch is the model
    weak_train: list[str] = field(default_factory=list)  # weak-label cases allowed into training
    exclude: list[str] = field(default_factory=list)


LESION_SELECTIONS = ("fixed", "inner")


@dataclass
class LesionConfig:
    """How the lesion threshold and minimum lesion size of the card are set. "fixed": the card's threshold
    and no minimum size (or [model] lesion_threshold / min_lesion_ml). "inner": chosen from this grid by
    inner leave-one-patient-out folds inside the training patients (runner.choose_lesion_settings), so an
    outer fold's test patient never shapes the settings it is judged with."""

    selection: str = "fixed"
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])
    min_sizes_ml: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.5, 1.0])
    # Lesion Dice given up per false lesion on a lesion-free liver (mean over those livers): a healthy
    # liver shown with a lesion costs a surgeon more than a slightly smaller Dice on a real one.
    false_lesion_penalty: float = 0.1
    # Candidates that take the lesions from the CT instead of the network (the card's lesion_rule,
    # postprocessing.darker_than_liver), each with every size of min_sizes_ml, judged beside the network's
    # candidates by the same inner folds. All three empty (the default): the network's lesions only.
    rule_sigmas_mm: list[float] = field(default_factory=list)
    rule_erodes_mm: list[float] = field(default_factory=list)
    rule_k_mads: list[float] = field(default_factory=list)

    def lesion_rules(self) -> list[dict[str, float]]:
        """Every lesion_rule of the grid (none when the rule lists are empty)."""
        lists = (self.rule_sigmas_mm, self.rule_erodes_mm, self.rule_k_mads)
        if any(lists) and not all(lists):
            raise LiverSegInputError("[lesion] rule_sigmas_mm, rule_erodes_mm and rule_k_mads are given together or not at all")
        rules = [{"sigma_mm": float(s), "erode_mm": float(e), "k_mad": float(k)} for s, e, k in itertools.product(*lists)]
        for rule in rules:
            checked_card_setting(check_lesion_rule, rule, "[lesion]")
        return rules


def checked_card_setting(check: Callable[[dict[str, Any]], None], settings: dict[str, Any], section: str) -> None:
    """A card's check of one setting (``model.check_lesion_rule``, ``model.check_graph_cut``) as a config error
    naming its ``section``."""
    try:
        check(settings)
    except ModelIntegrityError as error:
        raise LiverSegInputError(f"{section} {error}") from None


@dataclass
class TrainConfig:
    name: str = "liverseg-unet-resnet18"
    version: str = "0.1.0"
    output_dir: str = "runs/train"
    cache_dir: str = "runs/cache"
    seed: int = 0
    threads: int = 0  # 0: torch's default
    device: str = "auto"
    data: list[dict[str, Any]] = field(default_factory=lambda: [{"layout": "cases", "path": "${LIVERSEG_DATA}/cases"}])
    split: SplitConfig = field(default_factory=SplitConfig)
    model: dict[str, Any] = field(default_factory=dict)  # ModelCard fields: encoder, input_size, ...
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    lesion: LesionConfig = field(default_factory=LesionConfig)
    # A two-stage cascade: the network of [model] becomes stage 1 (the liver's box), and a second network is
    # trained on the same patients on crops around the liver (model.crop_margin_mm > 0). Its tables
    # ``model``, ``schedule`` and ``augment`` override this config's for stage 2 alone. Empty: one stage.
    # ``gate_margins_mm``: with lesion.selection = "inner", the gate margins the inner folds choose from
    # (runner.select_gate_margin); otherwise [stage2.model] gate_margin_mm holds.
    stage2: dict[str, Any] = field(default_factory=dict)
    # ``[graph_cuts]`` smoothness and contrast_hu (lists): with lesion.selection = "inner", the graph cuts of the
    # organ (every pair of the two, and none) the inner folds choose from (runner.select_graph_cut); otherwise
    # [model.graph_cut] holds.
    graph_cuts: dict[str, Any] = field(default_factory=dict)

    def graph_cut_candidates(self) -> list[dict[str, float]]:
        """Every graph cut of ``[graph_cuts]`` (empty: none, the card's own holds)."""
        if not self.graph_cuts:
            return []
        if set(self.graph_cuts) != {"smoothness", "contrast_hu"} or not all(isinstance(v, list) and v for v in self.graph_cuts.values()):
            raise LiverSegInputError(f"[graph_cuts] needs two non-empty lists, smoothness and contrast_hu, not {self.graph_cuts}")
        cuts = [{"smoothness": s, "contrast_hu": c} for s, c in itertools.product(self.graph_cuts["smoothness"], self.graph_cuts["contrast_hu"])]
        for cut in cuts:
            checked_card_setting(check_graph_cut, cut, "[graph_cuts]")
        return [{key: float(value) for key, value in cut.items()} for cut in cuts]

    def gate_margins_mm(self) -> list[float]:
        """The gate margins inner folds choose from (empty: none, the card's own margin holds)."""
        margins = [float(margin) for margin in self.stage2.get("gate_margins_mm", [])]
        if any(margin < 0 for margin in margins):
            raise LiverSegInputError(f"[stage2] gate_margins_mm must be 0 or above: {margins}")
        return margins

    def stage2_config(self) -> "TrainConfig":
        """The config that trains a cascade's stage 2: this one with ``stage2``'s overrides, its own output
        folder and weights file."""
        unknown = set(self.stage2) - {"model", "schedule", "augment", "gate_margins_mm"}
        if unknown:
            raise LiverSegInputError(f"unknown [stage2] keys: {', '.join(sorted(unknown))} (model, schedule, augment, gate_margins_mm)")
        model = {**self.model, **self.stage2.get("model", {})}
        if float(model.get("crop_margin_mm", 0.0)) <= 0:
            raise LiverSegInputError("[stage2.model] crop_margin_mm must be above 0: stage 2 sees the liver's box and a margin")
        return replace(
            self, model=model, stage2={},
            schedule=replace(self.schedule, **_checked(ScheduleConfig, self.stage2.get("schedule", {}), "stage2.schedule")),
            augment=replace(self.augment, **_checked(AugmentConfig, self.stage2.get("augment", {}), "stage2.augment")),
            output_dir=str(Path(self.output_dir) / "stage2"),
        )

    def card(self) -> ModelCard:
        allowed = {"architecture", "encoder", "decoder_channels", "input_size", "context_slices", "window_hu", "threshold", "lesion_threshold", "min_lesion_ml", "lesion_rule", "graph_cut", "crop_margin_mm", "gate_margin_mm"}
        unknown = set(self.model) - allowed
        if unknown:
            raise LiverSegInputError(f"unknown [model] keys: {', '.join(sorted(unknown))}")
        card = ModelCard(name=self.name, version=self.version, **copy.deepcopy(self.model))
        card.decoder_channels = tuple(card.decoder_channels)
        card.window_hu = tuple(card.window_hu)  # type: ignore[assignment]
        if card.crop_margin_mm > 0:
            card.weights_file = STAGE2_WEIGHTS_FILE
        checked_card_setting(check_lesion_rule, card.lesion_rule, "[model]")
        checked_card_setting(check_graph_cut, card.graph_cut, "[model]")
        if card.gate_margin_mm < 0 or (card.gate_margin_mm > 0 and card.crop_margin_mm <= 0):
            raise LiverSegInputError("gate_margin_mm is a cascade's stage-2 setting ([stage2.model]), 0 or above")
        return card


STAGE2_WEIGHTS_FILE = "liverseg.stage2.safetensors"


def _checked(cls, values: dict[str, Any], section: str) -> dict[str, Any]:
    """``values`` once every key is a field of ``cls`` (lists of tuple fields made tuples)."""
    built = _build(cls, values, section)
    return {key: getattr(built, key) for key in values}


def data_root() -> str:
    return os.environ.get("LIVERSEG_DATA", str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


def expand(path: str) -> str:
    return path.replace("${LIVERSEG_DATA}", data_root())


def _build(cls, values: dict[str, Any], section: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise LiverSegInputError(f"unknown keys in [{section}]: {', '.join(sorted(unknown))}")
    converted = {k: tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else v for k, v in values.items()}
    return cls(**converted)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise LiverSegInputError(f"override must look like section.key=value: {text}")
    key, raw = text.split("=", 1)
    try:  # a TOML value (number, bool, "string", [array], {inline = "table"}); bare words stay strings
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def read_toml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tables; ``extends = "OTHER.toml"`` (relative to the file) starts from that file's,
    which this one's keys override table by table, so a recipe that differs from another in a few keys
    says only those."""
    path = Path(path)
    if path.resolve() in seen:
        raise LiverSegInputError(f"config file {path} extends itself through {' → '.join(p.name for p in seen)}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LiverSegInputError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise LiverSegInputError(f"config file {path} is not valid TOML: {error}") from None
    base = raw.pop("extends", None)
    return merged(read_toml(path.parent / base, (*seen, path.resolve())), raw) if base else raw


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys: tables merged key by key, any other value replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else copy.deepcopy(value)
    return result


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for override in overrides:
        keys, value = parse_override(override)
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    sections = {"split": SplitConfig, "schedule": ScheduleConfig, "loss": LossWeights, "augment": AugmentConfig, "lesion": LesionConfig}
    built = {name: _build(cls, raw.pop(name, {}), name) for name, cls in sections.items()}
    config = _build(TrainConfig, {**raw, **built}, "top level")
    config.card()  # validates [model]
    if config.stage2:
        config.stage2_config().card()  # validates [stage2]
        config.gate_margins_mm()
    if config.lesion.selection not in LESION_SELECTIONS:
        raise LiverSegInputError(f"lesion.selection must be one of {', '.join(LESION_SELECTIONS)}, not '{config.lesion.selection}'")
    config.lesion.lesion_rules()  # validates the rule grid
    config.graph_cut_candidates()
    return config
