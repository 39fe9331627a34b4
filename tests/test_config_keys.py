"""Every TrainConfig field is a documented key; bad values are refused naming the key; TOML tables/lists load."""

import dataclasses
import os
import re

import pytest

from comfyui_lora_trainer.training.config import ConfigError, TrainConfig

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")


def test_every_key_is_documented_in_the_docs():
    text = open(DOCS, encoding="utf-8").read()
    section = text[text.index("<!-- BEGIN configuration keys"):text.index("<!-- END configuration keys")]
    documented = set(re.findall(r"^\| `([a-z_0-9]+)`(?: / `([a-z_0-9]+)`)?", section, flags=re.M))
    names = {n for pair in documented for n in pair if n}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    assert fields - names == set(), f"undocumented keys: {sorted(fields - names)}"
    assert names - fields == set(), f"documented keys that do not exist: {sorted(names - fields)}"


@pytest.mark.parametrize("key,value", [
    ("adapter", "ia3"), ("target", "everything"), ("optimizer", "adam"), ("lr_scheduler", "cosine_annealing"),
    ("loss_type", "l3"), ("cache_latents", "gpu"), ("attention", "xformers"), ("quantize_base", "8bit"),
    ("caption_dropout_rate", 1.5), ("min_bucket_reso", 32), ("lr_warmup_steps", 2.5), ("sample_sampler", "plms"),
    ("keep_last_n", -1), ("early_stopping_smoothing", 1.0), ("text_encoder_lr", 2.0), ("conv_rank", -1),
    ("family", "sd3"),
])
def test_bad_values_name_the_key(key, value):
    config = TrainConfig(checkpoint="c", dataset="d", **{key: value})
    with pytest.raises(ConfigError, match=key):
        config.validate()


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="train_unet"):
        TrainConfig(checkpoint="c", dataset="d", train_unet=False).validate()


def test_toml_tables_lists_and_relative_paths(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'checkpoint = "m.safetensors"\ndataset = "data"\nresume_from = "out/run_state_step4.pt"\n'
        'optimizer_args = {betas = [0.9, 0.99]}\nsample_prompts = ["a", "b"]\nlr_warmup_steps = 0.1\n'
        'text_encoder_lr = 0\nsteps = 50\n'
    )
    config = TrainConfig.from_toml(str(path)).validate()
    assert config.optimizer_args == {"betas": [0.9, 0.99]}
    assert config.sample_prompts == ["a", "b"]
    assert config.resume_from == str(tmp_path / "out" / "run_state_step4.pt")
    assert config.warmup_steps() == 5
    assert isinstance(config.text_encoder_lr, float)
