"""Training (LiverSegTraining/train.py) on real cases: a two-cycle run that exports a loadable model
and its plots, exact resume, and its steps on their own: the learning rate of each cycle, the best
checkpoint kept and the last one restored."""

from __future__ import annotations

from dataclasses import replace

from pathlib import Path

import numpy as np
import pytest
import torch

from LiverSegLib.pipeline import LiverSegmenter
from LiverSegTraining.cli import train_main
from LiverSegTraining.config import TrainConfig, load_config
from LiverSegTraining.data import prepare_case
from LiverSegTraining.sources import discover
from LiverSegTraining.train import TrainingState, build, checkpoint, restore, run_epoch, seed_everything, train

from conftest import read_case, tiny_config
from test_plots import read_strict_json

CPU = torch.device("cpu")


def test_two_cycle_training_exports_a_loadable_model_and_plots(data_root, tmp_path):
    """The bundled recipe, shrunk: curves with finite points, the LR each epoch started from, prediction
    panels at the end of each cycle, strict JSON everywhere, and a model both runtimes load."""
    output = tmp_path / "run"
    overrides = tiny_config(tmp_path, data_root)
    argv = ["LiverSegTraining/configs/bundled.toml", "--output", str(output)]
    for override in overrides:
        argv += ["--set", override]
    from conftest import PROJECT_ROOT

    argv[0] = str(PROJECT_ROOT / argv[0])
    assert train_main(argv) == 0
    history = read_strict_json(output / "final" / "history.json")
    assert [(h["cycle"], h["epoch"]) for h in history] == [(0, 0), (1, 0)]
    # Each epoch logs the LR it started from: the first epoch of each cycle, the cycle's maximum.
    assert [h["lr"] for h in history] == pytest.approx([load_config(None, overrides).schedule.lr] * 2, rel=1e-12)
    # dice.png plots these: training Dice always, validation Dice on the validation case.
    assert all(np.isfinite([h["train_liver_dice"], h["val_liver_dice"]]).all() for h in history)
    assert all(h["train_lesion_dice"] is None for h in history)  # no training case labels lesions
    for plot in ("loss.png", "dice.png", "lr.png", "panel_totalseg_example_dicom_MODEL.png"):
        assert (output / "final" / plot).stat().st_size > 5000, plot
    panels = sorted(p.name for p in (output / "final" / "panels").iterdir())
    for cycle in (1, 2):
        mine = [name for name in panels if name.startswith(f"cycle{cycle}_totalseg_example_dicom_MODEL_z")]
        assert len(mine) >= 2, panels
    assert len(panels) == 2 * len(mine)  # the same slices every cycle
    for written in output.rglob("*.json"):
        read_strict_json(written)
    card_path = output / "model" / "liverseg.json"
    card = read_strict_json(card_path)
    assert card["input_size"] == 64 and len(card["weights_sha256"]) == 64
    assert {c["case"] for c in card["training"]["cases"]} == {"dcmqi_ct3slice", "totalseg_example_sm_MODEL"}
    assert card["onnx_file"] == "liverseg.onnx" and len(card["onnx_sha256"]) == 64  # the graph for the CPU, torch-free
    # and the int8 graph the CPU runs by default, calibrated on the training cases
    assert card["int8_onnx_file"] == "liverseg.int8.onnx" and card["int8_calibration"]["cases"] == ["dcmqi_ct3slice", "totalseg_example_sm_MODEL"]
    assert LiverSegmenter(card_path, device="cpu").precision == "int8"
    ct, _ = read_case(data_root, "dcmqi_ct3slice")
    segmenter = LiverSegmenter(card_path, device="cpu", precision="fp32")
    assert segmenter.runtime == "onnxruntime"
    with_torch = LiverSegmenter(card_path, device="cpu", runtime="torch")
    result = segmenter.segment(ct, keep_probabilities=True)
    assert result.label_image.GetSize() == ct.GetSize()
    assert np.abs(result.probabilities - with_torch.segment(ct, keep_probabilities=True).probabilities).max() < 1e-4


def test_resume_continues_exactly(data_root, tmp_path):
    overrides = tiny_config(tmp_path, data_root, ["split.val=[]"])
    config = load_config(None, overrides)
    card = config.card()
    cases = [c for c in discover("cases", data_root / "cases") if c.name in ("dcmqi_ct3slice", "totalseg_example_sm_MODEL")]
    prepared = [prepare_case(c, card, tmp_path / "cache") for c in cases]
    straight = train(config, prepared, [], tmp_path / "straight")
    train(config, prepared, [], tmp_path / "interrupted", max_epochs=1)
    resumed = train(config, prepared, [], tmp_path / "interrupted", resume=True)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in straight.history]
    for name, tensor in straight.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name


def tiny_state(tmp_path: Path, data_root: Path, extra: list[str]) -> tuple[TrainConfig, TrainingState]:
    """A freshly built run of the tiny config on the smallest real case (30 slices), without validation."""
    config = load_config(None, tiny_config(tmp_path, data_root, ["split.val=[]", *extra]))
    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "totalseg_example_sm_MODEL"]
    prepared = prepare_case(case, config.card(), tmp_path / "cache")
    return config, build(config, [prepared], CPU, seed_everything(config.seed))


def test_each_cycle_starts_at_the_maximum_learning_rate(data_root, tmp_path):
    """Cosine warm restarts over cycles of two epochs of two steps: every cycle's first epoch trains from
    schedule.lr, its second from halfway down the cosine, the mean of schedule.lr and schedule.min_lr."""
    config, state = tiny_state(tmp_path, data_root, ["schedule.epochs_per_cycle=2", "schedule.batch_size=2"])
    top, middle = config.schedule.lr, (config.schedule.lr + config.schedule.min_lr) / 2
    lr_at_epoch_start = []
    for _ in range(4):  # two cycles
        lr_at_epoch_start.append(state.lr)
        run_epoch(state, config, [])
    assert lr_at_epoch_start == pytest.approx([top, middle, top, middle], rel=1e-9)
    assert [(r.cycle, r.epoch) for r in state.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # An epoch records the LR it started from, not the restart the scheduler sets after a cycle's last step.
    assert [r.lr for r in state.history] == pytest.approx(lr_at_epoch_start, rel=1e-12)


def test_checkpoint_keeps_the_best_epoch_and_restore_continues_from_the_last(data_root, tmp_path):
    """best.pt changes only when an epoch beats every earlier one; restore puts a fresh run exactly where
    checkpoint_last.pt left the latest one (weights, optimizer moments, LR, sampling RNG, history, position)."""
    # Three-epoch cycles: after two epochs the LR is mid-cycle, unlike a freshly built run's.
    config, state = tiny_state(tmp_path, data_root, ["schedule.epochs_per_cycle=3", "schedule.batch_size=2"])
    output = tmp_path / "run"
    output.mkdir()
    run_epoch(state, config, [])
    checkpoint(state, 0.6, output)
    best = {name: tensor.clone() for name, tensor in state.network.state_dict().items()}
    run_epoch(state, config, [])
    checkpoint(state, 0.4, output)
    kept = torch.load(output / "best.pt", weights_only=True)
    assert state.best_score == 0.6 and all(torch.equal(kept[name], best[name]) for name in best)
    assert not all(torch.equal(state.network.state_dict()[name], best[name]) for name in best)
    fresh = build(config, state.sampler.cases, CPU, seed_everything(config.seed + 1))
    assert not restore(fresh, tmp_path / "no-run")
    assert restore(fresh, output)
    assert (fresh.next_epoch, fresh.best_score, fresh.lr) == (2, 0.6, state.lr) and state.lr < config.schedule.lr
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict()
    moments = [s["exp_avg_sq"] for s in state.optimizer.state_dict()["state"].values()]
    restored = [s["exp_avg_sq"] for s in fresh.optimizer.state_dict()["state"].values()]
    assert len(restored) == len(moments) > 0 and all(torch.equal(a, b) for a, b in zip(moments, restored))
    assert [r.train_loss for r in fresh.history] == [r.train_loss for r in state.history]
    assert torch.equal(fresh.generator.get_state(), state.generator.get_state())
    for name, tensor in state.network.state_dict().items():
        assert torch.equal(tensor, fresh.network.state_dict()[name]), name


def test_config_extends_another(tmp_path):
    """``extends`` starts from another file's tables and overrides them key by key; the cascade recipe is the
    bundled one plus its own keys; a file that extends itself is refused."""
    from conftest import PROJECT_ROOT

    from LiverSegLib.errors import LiverSegInputError

    cascade = load_config(PROJECT_ROOT / "LiverSegTraining/configs/cascade.toml")
    bundled = load_config(PROJECT_ROOT / "LiverSegTraining/configs/bundled.toml")
    assert cascade.version == "0.3.0" and cascade.schedule == bundled.schedule
    assert cascade.model == {**bundled.model, "encoder": "tu-regnetx_002", "decoder_channels": [64, 32, 16, 8, 8], "input_size": 128,
                            "graph_cut": {"smoothness": 128.0, "contrast_hu": 10.0}}
    assert cascade.augment.noise_hu == (0.0, 25.0) and cascade.augment.scale == bundled.augment.scale  # one key changed, the rest kept
    assert cascade.augment.edge_probability == 0.1 and bundled.augment.edge_probability == 0.0
    stage2 = cascade.stage2_config()
    assert stage2.card().input_size == 224 and stage2.card().crop_margin_mm == 15.0 and stage2.card().encoder == "tu-regnetx_002"
    assert stage2.card().gate_margin_mm == 3.0 and cascade.card().gate_margin_mm == 0.0
    assert cascade.gate_margins_mm() == [0.0, 3.0, 5.0, 10.0, 15.0] and cascade.lesion.selection == "inner"
    # both stages cut their organ on the CT; the inner folds choose stage 1's among four cuts and none
    assert stage2.card().graph_cut == cascade.card().graph_cut and bundled.card().graph_cut == {}
    assert len(cascade.graph_cut_candidates()) == 4 and cascade.card().with_stage(2, stage2.card()).cuts()
    assert len(cascade.lesion.lesion_rules()) == 12 and bundled.lesion.lesion_rules() == []
    assert stage2.augment.synthetic_lesion_probability == 0.3 and cascade.augment.synthetic_lesion_probability == 0.0
    assert replace(stage2.augment, synthetic_lesion_probability=0.0) == cascade.augment  # the rest of the augmentation is stage 1's
    assert stage2.schedule.lesion_fraction == 0.33 and cascade.schedule.lesion_fraction == 0.0
    assert replace(stage2.schedule, lesion_fraction=0.0) == bundled.schedule  # the rest of the schedule is stage 1's
    assert stage2.card().weights_file == "liverseg.stage2.safetensors" and stage2.output_dir == "runs/cascade/stage2"
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n', encoding="utf-8")
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n', encoding="utf-8")
    with pytest.raises(LiverSegInputError, match="extends itself"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "bundled.toml"\n[stage2.model]\ninput_size = 224\n', encoding="utf-8")
    shutil_copy = (PROJECT_ROOT / "LiverSegTraining/configs/bundled.toml").read_text(encoding="utf-8")
    (tmp_path / "bundled.toml").write_text(shutil_copy, encoding="utf-8")
    with pytest.raises(LiverSegInputError, match="crop_margin_mm must be above 0"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('extends = "bundled.toml"\n[model]\ngate_margin_mm = 10.0\n', encoding="utf-8")
    with pytest.raises(LiverSegInputError, match="gate_margin_mm is a cascade's stage-2 setting"):
        load_config(tmp_path / "d.toml").card()
    (tmp_path / "e.toml").write_text('extends = "bundled.toml"\n[model.graph_cut]\nsmoothness = 128.0\n', encoding="utf-8")
    with pytest.raises(LiverSegInputError, match=r"\[model\] model card's graph_cut needs exactly smoothness, contrast_hu"):
        load_config(tmp_path / "e.toml").card()
    (tmp_path / "f.toml").write_text('extends = "bundled.toml"\n[model.graph_cut]\nsmoothness = 128.0\ncontrast_hu = 10.0\n', encoding="utf-8")
    assert load_config(tmp_path / "f.toml").card().graph_cut == {"smoothness": 128.0, "contrast_hu": 10.0}


def test_training_dice_pools_voxels_over_batches_by_hand():
    """The epoch's training Dice (``OverlapCounts``): voxels pooled over batches, a sample without a lesion
    label left out of the lesion channel, NaN where nothing was predicted or labelled."""
    from LiverSegTraining.train import OverlapCounts

    counts = OverlapCounts()
    assert np.isnan(counts.dice()).all()
    # batch 1: one 2×2 sample; liver predicted on 3 pixels, 2 of them labelled (3 labelled); lesion 1 of 1
    logits = torch.tensor([[[[5.0, 5.0], [5.0, -5.0]], [[5.0, -5.0], [-5.0, -5.0]]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    counts.add(logits, masks, torch.tensor([[1.0, 1.0]]), 0.5)
    # batch 2: liver predicted everywhere (4), labelled on 1; its lesion channel unlabelled, so a predicted
    # lesion there counts nowhere
    counts.add(torch.full((1, 2, 2, 2), 5.0), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0] * 2] * 2]]), torch.tensor([[1.0, 0.0]]), 0.5)
    liver, lesion = counts.dice()
    assert liver == pytest.approx(2 * (2 + 1) / ((3 + 4) + (3 + 1)))
    assert lesion == pytest.approx(1.0)


def test_mixed_precision_trains_in_bf16_and_keeps_float32_weights_and_loss(data_root, tmp_path):
    """``schedule.mixed_precision``: the same batch through the same network gives a float32 loss within bf16's
    rounding of the float32 run's (8 bits of mantissa: under 1 % here), the weights stay float32 and all of them
    move; without the flag nothing changes (the recipes' figures were trained so)."""
    from LiverSegTraining.augment import augment_batch
    from LiverSegTraining.train import OverlapCounts, optimisation_step

    losses = {}
    for mixed in (False, True):
        config, state = tiny_state(tmp_path, data_root, [f"schedule.mixed_precision={str(mixed).lower()}"])
        images, masks, channel_mask, weight = state.sampler.batch(config.schedule.batch_size, state.generator)
        images, masks = augment_batch(images, masks, config.augment, state.generator, state.card.window_hu)
        before = {name: tensor.clone() for name, tensor in state.network.named_parameters()}
        loss = optimisation_step(state, config, images, masks, channel_mask, weight, OverlapCounts())
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.dtype == torch.float32 and not torch.equal(p, before[name]) for name, p in state.network.named_parameters())
        losses[mixed] = float(loss)
    assert losses[True] != losses[False] and abs(losses[True] - losses[False]) < 0.01 * losses[False]
    assert load_config(None, []).schedule.mixed_precision is False
