"""The network and its model card: a segmentation-models-pytorch U-Net plus a JSON card.

The card is the single schema for a model (architecture, input, window, classes, SHA-256 of the
weights, training data and licences, the training command and the cross-validated figures). The
engine refuses weights whose hash does not match their card, so a tampered or truncated file never
segments anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ModelIntegrityError

CARD_SCHEMA_VERSION = 1
CHANNEL_NAMES = ("liver", "liver_lesion")
# A card's ``lesion_rule``: lesions as the part of the liver darker than the liver (postprocessing.darker_than_liver).
LESION_RULE_KEYS = ("sigma_mm", "erode_mm", "k_mad")
# A card's ``graph_cut``: the organ as a minimum cut on the CT (postprocessing.cut_organ).
GRAPH_CUT_KEYS = ("smoothness", "contrast_hu")
BUNDLED_CARD = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "liverseg.json"


@dataclass
class ModelCard:
    """Everything needed to rebuild, verify and judge a model; saved as JSON beside the weights."""

    name: str = "liverseg-unet-resnet18"
    version: str = "0.0.0"
    architecture: str = "Unet"
    encoder: str = "resnet18"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    input_size: int = 128
    context_slices: int = 1
    window_hu: tuple[float, float] = (-200.0, 300.0)
    channels: tuple[str, ...] = CHANNEL_NAMES
    threshold: float = 0.5
    # The lesion channel's own probability threshold (None: ``threshold``) and the smallest lesion kept, in
    # mL (26-connected components below it become liver; 0 keeps every one). Chosen on training patients
    # only (LiverSegTraining/runner.py, choose_lesion_settings); a card without them behaves as before.
    lesion_threshold: float | None = None
    min_lesion_ml: float = 0.0
    # Empty: lesions are the network's lesion channel. Otherwise {"sigma_mm", "erode_mm", "k_mad"}: lesions are
    # the part of the cleaned liver darker than the liver itself (postprocessing.darker_than_liver), the
    # network's lesion channel counting as liver; ``min_lesion_ml`` still applies. Chosen like the other
    # lesion settings, on training patients only.
    lesion_rule: dict[str, float] = field(default_factory=dict)
    # Empty: the organ is where the network's probability reaches the threshold. Otherwise {"smoothness",
    # "contrast_hu"}: the organ is the minimum graph cut of the network's probability on the CT
    # (postprocessing.cut_organ), its boundary drawn along the CT's edges; lesions stay the network's, inside it.
    graph_cut: dict[str, float] = field(default_factory=dict)
    lesions_validated: bool = False
    weights_file: str = "liverseg.safetensors"
    weights_sha256: str = ""
    # The network as an ONNX graph whose weights are read from ``weights_file`` itself (external data):
    # ONNX Runtime runs it without torch, and the repository keeps one copy of the weights.
    onnx_file: str = ""
    onnx_sha256: str = ""
    # The same network quantised to int8 (QDQ) for the CPU: also reads its weights from ``weights_file`` and
    # quantises them when the session starts; ``int8_calibration`` says how its activation ranges were
    # calibrated, for which weights, and the command that writes it (runtime.export_int8_graph).
    int8_onnx_file: str = ""
    int8_onnx_sha256: str = ""
    int8_calibration: dict[str, Any] = field(default_factory=dict)
    # 0: the network sees whole slices (a single-stage model, or stage 1 of a cascade). Above 0: it sees the
    # liver's box only, grown by this margin in mm on each side, padded to a square and resized to
    # ``input_size`` (preprocessing.liver_crop): about 1 mm a pixel for a 25 cm box at 256 px.
    crop_margin_mm: float = 0.0
    # A cascade's stage 2 only (0: off): stage 2's liver and lesions are kept within this distance in mm of
    # stage 1's liver (pipeline.stage2_gate). Stage 2 sees only its crop, so at the dome it can take the
    # heart, which fills much of that crop, for liver; stage 1 sees the whole slice and knows better.
    gate_margin_mm: float = 0.0
    # A two-stage cascade: this card's network (stage 1) finds the liver on whole slices at low resolution,
    # and the network described here (the ``STAGE2_FIELDS`` of its card, with its own weights and graphs
    # beside this card) segments liver and lesions inside stage 1's liver box at full detail. Thresholds,
    # lesion settings, training and evaluation are this card's: they judge the cascade's output. Empty: one stage.
    stage2: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    schema_version: int = CARD_SCHEMA_VERSION

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def stages(self) -> int:
        return 2 if self.stage2 else 1

    def stage_card(self, stage: int) -> "ModelCard":
        """The card of one stage's network: stage 1 is this card; stage 2 is this card with the network
        fields of ``stage2`` (its weights, graphs, input, crop), so that every function that builds, verifies,
        exports or runs a network takes either stage's card the same way."""
        if stage == 1:
            return self
        if stage != 2 or not self.stage2:
            raise ModelIntegrityError(f"model card {self.name} has no stage {stage}")
        unknown = set(self.stage2) - set(STAGE2_FIELDS)
        if unknown:
            raise ModelIntegrityError(f"model card's stage2 has unknown fields: {', '.join(sorted(unknown))}")
        card = replace(self, stage2={}, **self.stage2)
        card.decoder_channels = tuple(card.decoder_channels)
        card.window_hu = tuple(card.window_hu)  # type: ignore[assignment]
        return card

    def with_stage(self, stage: int, stage_card: "ModelCard") -> "ModelCard":
        """This card with one stage's network fields taken from ``stage_card`` (what ``stage_card`` inverts)."""
        if stage == 1:
            return replace(stage_card, stage2=self.stage2)
        return replace(self, stage2={name: getattr(stage_card, name) for name in STAGE2_FIELDS})

    @property
    def lesion_channel_threshold(self) -> float:
        """The lesion channel's probability threshold: its own when the card sets one, since the threshold
        that best separates lesions need not be the liver's; else the card's."""
        return self.threshold if self.lesion_threshold is None else self.lesion_threshold

    def cuts(self) -> bool:
        """Whether a stage cuts its organ on the CT (``graph_cut``): such a card needs Numba, the ``graphcut``
        extra, which the engine checks on load and the Slicer module installs with the rest."""
        return any(self.stage_card(stage).graph_cut for stage in range(1, self.stages + 1))

    def channel_thresholds(self) -> tuple[float, ...]:
        """The probability threshold of each channel (``lesion_channel_threshold`` for the lesion channel)."""
        return tuple(self.lesion_channel_threshold if name == "liver_lesion" else self.threshold for name in self.channels)

    def to_json(self) -> str:
        """Strict JSON that any reader loads: a value that was never measured (NaN) is written as null."""
        from .outputs import strict_json

        return strict_json(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        if data.get("schema_version") != CARD_SCHEMA_VERSION:
            raise ModelIntegrityError(f"model card schema {data.get('schema_version')} is not {CARD_SCHEMA_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelIntegrityError(f"model card has unknown fields: {', '.join(sorted(unknown))}")
        card = cls(**data)
        card.decoder_channels = tuple(card.decoder_channels)
        card.window_hu = tuple(card.window_hu)  # type: ignore[assignment]
        card.channels = tuple(card.channels)
        if card.stage2:
            card.stage_card(2)  # refuses unknown stage-2 fields when the card is read
        check_lesion_rule(card.lesion_rule)
        check_graph_cut(card.graph_cut)
        return card


def check_card_numbers(field: str, settings: dict[str, Any], keys: tuple[str, ...], above_zero: tuple[str, ...]) -> None:
    """A card's ``field`` (a dict of settings) is empty or has exactly ``keys``, numbers of 0 or more, those
    of ``above_zero`` above 0: the one check of every such field, so each says its problem the same way."""
    if not settings:
        return
    if set(settings) != set(keys):
        raise ModelIntegrityError(f"model card's {field} needs exactly {', '.join(keys)}, not {', '.join(sorted(settings))}")
    numbers = all(not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0 for value in settings.values())
    if not numbers or any(settings[key] <= 0 for key in above_zero):
        bar = "numbers above 0" if set(above_zero) == set(keys) else f"numbers of 0 or more ({', '.join(above_zero)} above 0)"
        raise ModelIntegrityError(f"model card's {field} needs {bar}: {settings}")


def check_lesion_rule(rule: dict[str, Any]) -> None:
    check_card_numbers("lesion_rule", rule, LESION_RULE_KEYS, ("k_mad",))


def check_graph_cut(settings: dict[str, Any]) -> None:
    check_card_numbers("graph_cut", settings, GRAPH_CUT_KEYS, GRAPH_CUT_KEYS)


# What a cascade's card keeps of its stage-2 network's card (everything that builds, verifies and runs it).
STAGE2_FIELDS = (
    "architecture", "encoder", "decoder_channels", "input_size", "context_slices", "window_hu", "crop_margin_mm", "gate_margin_mm",
    "graph_cut", "weights_file", "weights_sha256", "onnx_file", "onnx_sha256", "int8_onnx_file", "int8_onnx_sha256", "int8_calibration",
)


def read_card(card_path: str | Path = BUNDLED_CARD) -> ModelCard:
    card_path = Path(card_path)
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelIntegrityError(f"model card not found: {card_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelIntegrityError(f"model card {card_path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelIntegrityError(f"model card {card_path} is not a JSON object")
    return ModelCard.from_dict(data)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_network(card: ModelCard):
    """A randomly initialised U-Net of the card's shape (never downloads encoder weights)."""
    import segmentation_models_pytorch as smp

    network_class = getattr(smp, card.architecture)
    return network_class(
        encoder_name=card.encoder,
        encoder_weights=None,
        in_channels=card.in_channels,
        classes=len(card.channels),
        decoder_channels=tuple(card.decoder_channels),
    )


def verify_model(card_path: str | Path = BUNDLED_CARD) -> tuple[ModelCard, Path]:
    """(card, stage-1 weights path) once the SHA-256 of every stage's weights matches the card; every way
    of running a model starts here, so tampered weights are refused whichever runtime would have used them."""
    card_path = Path(card_path)
    card = read_card(card_path)
    for stage in range(card.stages, 0, -1):
        stage_card = card.stage_card(stage)
        weights_path = stage_weights_path(stage_card, card_path)
        _check_file(weights_path, stage_card.weights_sha256, "model weights" if stage == 1 else "stage-2 model weights")
    return card, weights_path


def stage_weights_path(stage_card: ModelCard, card_path: str | Path) -> Path:
    """Where a stage's weights lie: beside the card."""
    return Path(card_path).parent / stage_card.weights_file


def verify_onnx(card: ModelCard, card_path: str | Path) -> Path | None:
    """The card's ONNX graph once its SHA-256 matches (None when the card has none)."""
    if not card.onnx_file:
        return None
    onnx_path = Path(card_path).parent / card.onnx_file
    _check_file(onnx_path, card.onnx_sha256, "model graph")
    return onnx_path


def verify_int8_onnx(card: ModelCard, card_path: str | Path) -> Path | None:
    """The card's int8 graph once its SHA-256 matches and it was calibrated for these weights (None when
    the card has none)."""
    if not card.int8_onnx_file:
        return None
    onnx_path = Path(card_path).parent / card.int8_onnx_file
    _check_file(onnx_path, card.int8_onnx_sha256, "int8 model graph")
    if card.int8_calibration.get("weights_sha256") != card.weights_sha256:
        raise ModelIntegrityError(f"int8 model graph {onnx_path.name} was made for other weights than {card.weights_file}")
    return onnx_path


def _check_file(path: Path, expected_sha256: str, what: str) -> None:
    if not path.is_file():
        raise ModelIntegrityError(f"{what} not found: {path}")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelIntegrityError(f"{what} {path.name} fails its SHA-256 check (card {expected_sha256[:12]}…, file {actual[:12]}…)")


def load_model(card_path: str | Path = BUNDLED_CARD):
    """(card, network in eval mode on the CPU) after checking the weights' SHA-256 against the card."""
    card, weights_path = verify_model(card_path)
    return card, load_network(card, weights_path)


def load_network(card: ModelCard, weights_path: Path):
    """The torch network of ``card`` with the (already verified) weights at ``weights_path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelIntegrityError(f"model weights {weights_path} cannot be loaded: {error}") from None
    network = build_network(card)
    network.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return network.eval()


def save_model(network, card: ModelCard, card_path: str | Path, stage2_network=None) -> ModelCard:
    """Write half-precision safetensors weights (fp16 halves git size) of the network and, for a cascade,
    of ``stage2_network``, and the card with their SHA-256."""
    card_path = Path(card_path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card.weights_sha256 = _save_weights(network, stage_weights_path(card, card_path))
    if stage2_network is not None:
        stage2 = card.stage_card(2)
        stage2.weights_sha256 = _save_weights(stage2_network, stage_weights_path(stage2, card_path))
        card = card.with_stage(2, stage2)
    write_card(card, card_path)
    return card


def _save_weights(network, weights_path: Path) -> str:
    """The network's weights as fp16 safetensors at ``weights_path``; returns the file's SHA-256."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in network.state_dict().items()}
    state = {name: t.half() if t.is_floating_point() else t for name, t in state.items()}
    save_file(state, str(weights_path))
    return sha256_of(weights_path)


def write_card(card: ModelCard, card_path: str | Path) -> None:
    """The card as strict JSON, written atomically: a reader never sees half a card."""
    from .outputs import write_strict_json

    write_strict_json(asdict(card), card_path)
