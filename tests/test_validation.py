"""Validation loss (issue 15), the pieces outside the loop: the held-out split, the deterministic evaluator,
the best-step bookkeeping, the config keys and the metadata fields."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.dataset import DatasetError, load_dataset
from comfyui_lora_trainer.training.validation import (
    BestTracker,
    ValidationSample,
    ddpm_rule,
    evaluate,
    flow_rule,
    load_training_sets,
    split_validation,
    validation_count,
    validation_noise,
    validation_run_info,
    validation_steps,
    validation_timesteps,
)


def make_dataset(root, names, repeats_folder=None):
    for name in names:
        folder = os.path.join(root, repeats_folder) if repeats_folder else root
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (16, 16), (len(name) * 20 % 255, 10, 10)).save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(f"picture {name}")
    return str(root)


# -- the split ---------------------------------------------------------------------------------------------
def test_validation_count_fraction_and_count():
    assert validation_count(10, 0) == 0
    assert validation_count(10, 0.25) == 2  # round(2.5) (banker's) -> 2
    assert validation_count(10, 0.01) == 1  # at least one
    assert validation_count(10, 3) == 3
    with pytest.raises(DatasetError, match="at least one"):
        validation_count(4, 4)
    with pytest.raises(DatasetError, match="validation_split"):
        validation_count(2, 0.9)


def test_split_is_reproducible_disjoint_and_held_out_images_never_train(tmp_path):
    root = make_dataset(tmp_path / "d", [f"img{i}" for i in range(6)], "5_thing")
    make_dataset(tmp_path / "d", [f"top{i}" for i in range(4)])
    dataset = load_dataset(root)
    train, val = split_validation(dataset, 0.3, seed=7)
    again_train, again_val = split_validation(load_dataset(root), 0.3, seed=7)
    paths = lambda ds: [item.image_path for item in ds.items]  # noqa: E731
    assert paths(val) == paths(again_val) and paths(train) == paths(again_train)
    assert len(val.items) == 3 and len(train.items) == 7
    assert set(paths(train)).isdisjoint(paths(val))
    assert set(paths(train)) | set(paths(val)) == set(paths(dataset))
    held = set(paths(val))
    trained = {train.items[i].image_path for i in train.epoch_indices()}
    assert trained.isdisjoint(held)  # no repeat of a held-out image trains
    assert train.num_samples == dataset.num_samples - sum(
        item.repeats for item in dataset.items if item.image_path in held)
    assert all(item.repeats == 1 for item in val.items)
    # the choice does not depend on the order of the items, only on the seed
    shuffled = load_dataset(root)
    shuffled.items.reverse()
    assert set(paths(split_validation(shuffled, 0.3, seed=7)[1])) == held
    assert any(set(paths(split_validation(dataset, 0.3, seed=s)[1])) != held for s in range(1, 6))


def test_load_training_sets_splits_before_balancing_reg_images(tmp_path):
    root = make_dataset(tmp_path / "d", [f"img{i}" for i in range(4)], "3_thing")
    reg = make_dataset(tmp_path / "reg", ["r0", "r1"], "1_class")
    config = TrainConfig(checkpoint="c", dataset=root, reg_dataset=reg, validation_split=1, seed=3)
    train, val = load_training_sets(config.validate())
    assert len(val.items) == 1 and not val.items[0].is_reg
    assert train.num_train_samples == 9 and train.num_reg_samples == 9  # balanced against what trains
    config = TrainConfig(checkpoint="c", dataset=root, validation_dataset=str(tmp_path / "reg"))
    train, val = load_training_sets(config.validate())
    assert train.num_train_samples == 12 and [i.repeats for i in val.items] == [1, 1]
    assert load_training_sets(TrainConfig(checkpoint="c", dataset=root))[1] is None


def test_split_refuses_a_dataset_with_reg_images(tmp_path):
    root = make_dataset(tmp_path / "d", ["a", "b"])
    reg = make_dataset(tmp_path / "reg", ["r"])
    with pytest.raises(ValueError, match="before add_regularization"):
        split_validation(load_dataset(root, reg), 1, 0)


# -- fixed timesteps and noise ---------------------------------------------------------------------------
def test_fixed_timesteps_cover_the_trained_range():
    assert validation_timesteps() == [10, 350, 500, 650, 990]
    ts = validation_timesteps(200, 800)
    assert ts == sorted(ts) and ts[0] >= 200 and ts[-1] < 800 and len(ts) == 5
    assert validation_timesteps(0, 2) == [0, 1]


def test_validation_steps():
    assert validation_steps(10, 0) == [0, 10]
    assert validation_steps(10, 4) == [0, 4, 8, 10]
    assert validation_steps(12, 4) == [0, 4, 8, 12]
    assert validation_steps(12, 4, start_step=5) == [5, 8, 12]


def test_noise_is_per_sample_and_timestep():
    a = validation_noise(0, 3, 1, (4, 8, 8))
    assert torch.equal(a, validation_noise(0, 3, 1, (4, 8, 8)))
    assert not torch.equal(a, validation_noise(0, 3, 2, (4, 8, 8)))
    assert not torch.equal(a, validation_noise(0, 4, 1, (4, 8, 8)))
    assert not torch.equal(a, validation_noise(1, 3, 1, (4, 8, 8)))


# -- the evaluator -----------------------------------------------------------------------------------------
class ToyModel(torch.nn.Module):
    """Per-pixel: each sample's prediction depends on its own input only (as a UNet's does)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))
        self.dropout = torch.nn.Dropout(0.5)
        self.calls = []

    def forward(self, noisy, timesteps, conditionings):
        self.calls.append((noisy.shape[0], torch.is_grad_enabled(), self.training))
        cond = torch.tensor(conditionings, dtype=noisy.dtype).view(-1, 1, 1, 1)
        return self.dropout(noisy * self.scale + cond + timesteps.view(-1, 1, 1, 1) / 1000)


def samples(n=4, masks=False):
    generator = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        mask = None
        if masks:
            mask = torch.ones(1, 8, 8)
            mask[..., :4] = 0
        out.append(ValidationSample(i, torch.randn(4, 8, 8, generator=generator), float(i) / 10, mask))
    return out


@pytest.fixture()
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_evaluate_is_the_same_for_every_batch_size_and_rerun(scheduler):
    from comfyui_lora_trainer.training.validation import eval_mode

    model = ToyModel().train()
    rule, ts = ddpm_rule(scheduler, "epsilon"), validation_timesteps()
    with eval_mode(model):
        one = evaluate(model, samples(), ts, rule, seed=11, batch_size=1)
        three = evaluate(model, samples(), ts, rule, seed=11, batch_size=3)
        again = evaluate(model, samples(), ts, rule, seed=11, batch_size=3)
    assert model.training and model.dropout.training  # eval_mode restores the training flags
    assert one.loss == three.loss == again.loss
    assert one.per_timestep == three.per_timestep and one.per_sample == three.per_sample
    assert {n for n, _, _ in model.calls} == {1, 3, 2}  # 20 pairs in batches of 3: the last holds 2
    assert not any(grad for _, grad, _ in model.calls) and not any(training for _, _, training in model.calls)
    assert math.isclose(one.loss, sum(one.per_timestep.values()) / len(ts), rel_tol=1e-12)
    # a sample's loss does not depend on which other samples are evaluated with it
    alone = evaluate(model.eval(), samples()[2:3], ts, rule, seed=11, batch_size=2)
    assert alone.per_sample[2] == one.per_sample[2]
    assert evaluate(model, samples(), ts, rule, seed=12).loss != one.loss


def test_evaluate_follows_the_model_and_the_mask(scheduler):
    model = ToyModel().eval()
    rule, ts = ddpm_rule(scheduler, "v_prediction"), [100, 900]
    before = evaluate(model, samples(masks=True), ts, rule, seed=0, batch_size=2).loss
    with torch.no_grad():
        model.scale.add_(0.1)
    assert evaluate(model, samples(masks=True), ts, rule, seed=0, batch_size=2).loss != before
    # the masked half does not count: changing the latents there leaves the loss as it was
    changed = samples(masks=True)
    for s in changed:
        s.latent[..., :4] += 3
    masked = evaluate(model, samples(masks=True), ts, rule, seed=0)
    assert evaluate(model, changed, ts, rule, seed=0).loss == masked.loss
    assert evaluate(model, changed, ts, rule, seed=0).loss != evaluate(model, samples(), ts, rule, seed=0).loss
    # a pixel-size mask (reduced by area) and a sample without a mask share a batch
    mixed = samples(masks=True)
    mixed[0].mask = torch.ones(1, 64, 64)
    mixed[0].mask[..., :32] = 0
    mixed[1].mask = None
    full = samples(masks=True)
    full[1].mask = torch.ones(1, 8, 8)
    assert evaluate(model, mixed, ts, rule, seed=0, batch_size=4).loss == evaluate(model, full, ts, rule, seed=0).loss


def test_target_rules(scheduler):
    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
    eps, v = ddpm_rule(scheduler, "epsilon"), ddpm_rule(scheduler, "v_prediction")
    assert torch.equal(eps.target(x, n, t), n) and torch.equal(eps.noisy(x, n, t), scheduler.add_noise(x, n, t))
    assert torch.equal(v.target(x, n, t), scheduler.get_velocity(x, n, t))
    flow = flow_rule(1000)
    assert torch.allclose(flow.noisy(x, n, t)[1], 0.01 * x[1] + 0.99 * n[1])
    assert torch.equal(flow.target(x, n, t), n - x)
    with pytest.raises(ValueError, match="prediction type"):
        ddpm_rule(scheduler, "sample")


def test_evaluate_refuses_duplicate_ids():
    s = samples(2)
    s[1].sample_id = 0
    with pytest.raises(ValueError, match="distinct"):
        evaluate(ToyModel(), s, [10], flow_rule(), seed=0)


# -- best step, early stopping ---------------------------------------------------------------------------
def test_best_tracker():
    tracker = BestTracker(patience=10, min_delta=0.01)
    assert not tracker.should_stop(5)
    assert tracker.update(0, 1.0) and tracker.best_step == 0
    assert tracker.update(4, 0.5)
    assert not tracker.update(8, 0.495)  # not better by more than min_delta
    assert tracker.last == 0.495 and tracker.best == 0.5 and tracker.best_step == 4
    assert not tracker.should_stop(12) and tracker.should_stop(14)
    assert not tracker.update(16, float("nan")) and tracker.best == 0.5
    restored = BestTracker.from_dict(tracker.to_dict(), patience=10, min_delta=0.01)
    assert restored == tracker
    assert not BestTracker(patience=0).should_stop(10**6)
    from comfyui_lora_trainer.training.validation import best_path

    assert best_path("out", "my_lora") == os.path.join("out", "my_lora_best.safetensors")


# -- config and metadata -----------------------------------------------------------------------------------
@pytest.mark.parametrize("values,key", [
    ({"validation_split": 1.5}, "validation_split"),
    ({"validation_split": -0.1}, "validation_split"),
    ({"validation_split": 0.1, "validation_dataset": "v"}, "validation_split"),
    ({"validate_every_n_steps": 10}, "validate_every_n_steps"),
    ({"early_stopping_metric": "val"}, "early_stopping_metric"),
    ({"early_stopping_metric": "validation", "early_stopping_patience": 5}, "early_stopping_metric"),
    ({"early_stopping_metric": "validation", "validation_split": 0.1}, "early_stopping_metric"),
    ({"keep_best": True}, "keep_best"),
    ({"mask_dir": "m"}, "mask_dir"),
    ({"validation_seed": -1}, "validation_seed"),
    ({"masked_loss": "yes"}, "masked_loss"),
])
def test_bad_issue15_settings_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig(checkpoint="c", dataset="d", **values).validate()


def test_good_issue15_settings_and_toml_paths(tmp_path):
    config = TrainConfig(checkpoint="c", dataset="d", validation_split=4.0, validate_every_n_steps=50,
                         early_stopping_metric="validation", early_stopping_patience=200, keep_best=True,
                         masked_loss=True, mask_dir="m", alpha_mask=True).validate()
    assert config.effective_validation_seed == 0
    assert TrainConfig(checkpoint="c", dataset="d", seed=5).effective_validation_seed == 5
    assert TrainConfig(checkpoint="c", dataset="d", seed=5, validation_seed=9).effective_validation_seed == 9
    path = tmp_path / "run.toml"
    path.write_text('checkpoint = "c"\ndataset = "d"\nmasked_loss = true\nmask_dir = "masks2"\n'
                    'validation_dataset = "val"\n')
    config = TrainConfig.from_toml(str(path)).validate()
    assert config.mask_dir == str(tmp_path / "masks2") and config.validation_dataset == str(tmp_path / "val")


def test_metadata_fields():
    from comfyui_lora_trainer.training.formats import RunInfo, make_metadata

    config = TrainConfig(checkpoint="c", dataset="d", validation_split=0.2, masked_loss=True, seed=3)
    tracker = BestTracker()
    assert validation_run_info(config, tracker) == {"masked_loss": True}
    tracker.update(0, 0.2)
    tracker.update(10, 0.1)
    tracker.update(20, 0.15)
    md = make_metadata(RunInfo(family="sd1", **validation_run_info(config, tracker, 4)))
    assert md["ss_validation_loss"] == "0.15" and md["ss_validation_step"] == "20"
    assert md["ss_best_validation_loss"] == "0.1" and md["ss_best_validation_step"] == "10"
    assert md["ss_validation_split"] == "0.2" and md["ss_validation_seed"] == "3"
    assert md["ss_num_validation_images"] == "4" and md["ss_masked_loss"] == "True"
    assert "ss_validation_loss" not in make_metadata(RunInfo(family="sd1"))


# -- where the curve is shown: run record, LOSS_MAP outputs, PNG, CLI log -----------------------------------
def test_run_record_keeps_the_validation_curve():
    from comfyui_lora_trainer.nodes.runs import RunRegistry

    registry = RunRegistry()
    run = registry.start("5", "p", 10, "x").run_id
    registry.add_step(run, 1, 10, 0.5, 1.0)
    registry.add_validation(run, 0, 0.9)
    registry.add_validation(run, 4, 0.7)
    registry.add_validation(run, 4, 0.6)  # a resumed run measures its start again: replaced, not doubled
    assert registry.get(run)["validation"] == [{"step": 0, "loss": 0.9}, {"step": 4, "loss": 0.6}]


def test_loss_maps_for_core_plot_loss_graph():
    from comfyui_lora_trainer.nodes.runs import loss_maps

    training, validation = loss_maps([0.5, 0.4, 0.3, 0.2, 0.1], [{"step": 0, "loss": 0.9}, {"step": 2, "loss": 0.8},
                                                                {"step": 5, "loss": 0.7}])
    assert training["loss"] == [0.5, 0.4, 0.3, 0.2, 0.1]  # what core's Plot Loss Graph reads
    assert training["validation_steps"] == [0, 2, 5] and training["validation_loss"] == [0.9, 0.8, 0.7]
    assert validation["loss"] == [0.9, 0.8, 0.8, 0.8, 0.7]  # one value per step 1..5: same x axis
    assert loss_maps([0.5], []) == ({"loss": [0.5]}, {"loss": []})


def test_loss_png_draws_the_validation_series():
    from comfyui_lora_trainer.training.plot import VALIDATION_COLOUR, loss_chart

    losses = [1.0 - i / 100 for i in range(50)]
    plain = loss_chart(losses)
    with_val = loss_chart(losses, validation=[(0, 1.2), (25, 0.8), (50, 0.9)])
    green = lambda image: int((np.asarray(image) == VALIDATION_COLOUR).all(-1).sum())  # noqa: E731
    assert green(plain) == 0 and green(with_val) > 50
    assert green(loss_chart([], validation=[(0, 1.0)])) > 0


def test_cli_log_prints_validation(capsys):
    from comfyui_lora_trainer.training.cli import _print_events

    handle = _print_events(10)
    handle({"type": "validation", "step": 20, "loss": 0.123456, "best": 0.1, "best_step": 10})
    handle({"type": "validation", "step": 0, "loss": 0.2})
    out = capsys.readouterr().out
    assert "step 20: validation loss 0.12346 (best 0.10000 at step 10)" in out
    assert "step 0: validation loss 0.20000\n" in out


# -- the evaluator on the tiny SD1 model (the loop's model call, outside the loop) -------------------------
def test_evaluate_on_a_tiny_unet_is_deterministic_and_moves_with_the_weights(tmp_path, scheduler):
    from comfyui_lora_trainer.training.cache import encode_distribution
    from comfyui_lora_trainer.training.models import build_tiny_components, encode_prompts
    from comfyui_lora_trainer.training.validation import build_samples, eval_mode

    root = make_dataset(tmp_path / "val", [f"v{i}" for i in range(3)])
    os.makedirs(tmp_path / "val" / "masks")
    Image.new("L", (16, 16), 255).save(tmp_path / "val" / "masks" / "v0.png")
    base = build_tiny_components("sd1", seed=0)
    items = load_dataset(root).items

    def condition(item, pixels):
        assert pixels.original_size == (16, 16) and pixels.crop_top_left == (0, 0)
        with torch.no_grad():
            return encode_prompts(base, [item.caption]).encoder_hidden_states[0]

    samples = build_samples(items, [(64, 64)] * 3, lambda px: encode_distribution(base, px), condition,
                            masked_loss=True)
    assert [s.sample_id for s in samples] == [0, 1, 2] and samples[0].mask.shape == (1, 8, 8)
    assert torch.equal(samples[0].mask, torch.ones(1, 8, 8)) and torch.equal(samples[1].mask, torch.ones(1, 8, 8))
    unet = base.unet

    def predict(noisy, timesteps, conditionings):
        return unet(noisy, timesteps, torch.stack(conditionings)).sample

    rule, ts = ddpm_rule(base.noise_scheduler, base.prediction_type), validation_timesteps()[::2]
    with eval_mode(unet):
        one = evaluate(predict, samples, ts, rule, seed=0, batch_size=1)
        three = evaluate(predict, samples, ts, rule, seed=0, batch_size=3)
        again = evaluate(predict, samples, ts, rule, seed=0, batch_size=3)
        assert again.loss == three.loss
        assert math.isclose(one.loss, three.loss, rel_tol=1e-6)  # batched kernels may differ in the last bits
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        assert evaluate(predict, samples, ts, rule, seed=0, batch_size=3).loss != three.loss


def test_resume_refuses_another_validation_split():
    from comfyui_lora_trainer.training.state import ResumeError, check_compatible

    saved = TrainConfig(checkpoint="c", dataset="d", validation_split=0.2, steps=10).to_dict()
    state = {"config": saved, "path": "s.pt", "step": 5}
    check_compatible(state, dict(saved))
    with pytest.raises(ResumeError, match="validation_split"):
        check_compatible(state, {**saved, "validation_split": 0.3})
    old = {k: v for k, v in saved.items() if k not in ("validation_split", "validation_seed")}  # an older state
    check_compatible({**state, "config": old}, dict(saved))


# -- the loop (the issue's test) ---------------------------------------------------------------------------
def overfit_run(tmp_path, name, **over):
    """A tiny SD1 model trained to overfit four of the sample shapes while validating on the four others."""
    from tiny_runs import run

    events = []
    values = dict(steps=24, batch_size=4, rank=4, alpha=8.0, learning_rate=2e-3, validation_split=4,
                  validate_every_n_steps=6, output_dir=str(tmp_path), output_name=name, keep_best=True)
    values.update(over)
    result, _ = run(events=events.append, **values)
    return result, events


def test_overfit_four_validate_on_four_reported_every_n_steps_and_identical_on_a_rerun(tmp_path):
    from safetensors import safe_open

    result, events = overfit_run(tmp_path, "a")
    losses = result.losses
    assert sum(losses[-6:]) / 6 < 0.97 * sum(losses[:6]) / 6, losses  # the training loss falls (by ~5%)
    measured = [(e["step"], e["loss"]) for e in events if e["type"] == "validation"]
    assert [s for s, _ in measured] == [0, 6, 12, 18, 24]  # before the first step, every 6, the last
    assert measured == result.validation and all(math.isfinite(v) for _, v in measured)
    assert len({v for _, v in measured}) == len(measured)  # it moves with the LoRA
    start = next(e for e in events if e["type"] == "start")
    assert start["images"] == 4  # the four held-out images never train
    best_step, best = min(measured, key=lambda p: p[1])
    assert (result.best_validation_step, result.best_validation_loss) == (best_step, best)
    with safe_open(result.path, "pt") as f:
        meta = f.metadata()
    assert float(meta["ss_validation_loss"]) == measured[-1][1] and meta["ss_validation_step"] == "24"
    assert float(meta["ss_best_validation_loss"]) == best and meta["ss_num_validation_images"] == "4"
    if best_step > 0:  # keep_best: the LoRA of that step, written as <name>_best
        assert result.best_path == os.path.join(str(tmp_path), "a_best.safetensors")
        with safe_open(result.best_path, "pt") as f:
            assert f.metadata()["ss_steps"] == str(best_step)
    rerun, _ = overfit_run(tmp_path, "b")
    assert rerun.validation == result.validation  # identical values, not just close


def test_keep_best_refuses_an_existing_best_file_and_validation_can_stop_early(tmp_path):
    from comfyui_lora_trainer.training.validation import best_path

    open(best_path(str(tmp_path), "c"), "wb").close()
    with pytest.raises(FileExistsError, match="c_best"):
        overfit_run(tmp_path, "c", steps=2)
    # patience 1 with min_delta huge: no measurement after step 0 counts as better, so step 2 stops the run
    result, events = overfit_run(tmp_path, "d", steps=8, validate_every_n_steps=2, keep_best=False,
                                 early_stopping_metric="validation", early_stopping_patience=1,
                                 early_stopping_min_delta=100.0)
    assert result.early_stopped and result.steps_done == 2
    assert [s for s, _ in result.validation] == [0, 2]
