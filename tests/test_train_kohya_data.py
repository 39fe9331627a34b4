"""kohya parity, data and sampling side: regularization images + prior_loss_weight, max_token_length, caption
wildcards, token warmup, per-prompt sample settings, fp8_base and torch_compile. Tiny models, a few steps."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.training import cache as cache_mod
from comfyui_lora_trainer.training.base_options import FP8_DTYPE
from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.dataset import DatasetError, expand_wildcards, load_dataset, process_caption, \
    warmup_token_count
from comfyui_lora_trainer.training.loop import TrainingError, sample_generator
from comfyui_lora_trainer.training.models import build_tiny_components
from comfyui_lora_trainer.training.models.conditioning import encode_prompts, tokenize_chunks
from comfyui_lora_trainer.training.sampling import parse_prompt

from tiny_runs import cfg, run

LONG = ", ".join(f"tag{i}" for i in range(40))  # 231 tokens with the tiny byte-level tokenizer
OTHER_TAIL = LONG.replace("tag15", "zzz15").replace("tag20", "qqq20")  # differs at tokens 82-117 only


def image(path, color, size=(72, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root, sub, n, caption=None, color0=0):
    for i in range(n):
        image(os.path.join(root, sub, f"{i}.png"), ((color0 + 40 * i) % 256, 90, 200 - 20 * i))
        if caption is not None:
            with open(os.path.join(root, sub, f"{i}.txt"), "w") as f:
                f.write(caption.format(i=i))
    return str(root)


def record_samples(monkeypatch):
    """(sample_number, item_index, caption, is_reg) for every training sample made."""
    seen = []
    from comfyui_lora_trainer.training.stages import step as step_mod

    original = step_mod.make_sample

    def spy(ctx, base, data, objective, sample_number, item_index, step):
        out = original(ctx, base, data, objective, sample_number, item_index, step)
        seen.append((sample_number, item_index, out["caption"], data.dataset.items[item_index].is_reg, step))
        return out

    monkeypatch.setattr(step_mod, "make_sample", spy)
    return seen


# ------------------------------------------------------------------ regularization images

@pytest.fixture()
def reg_data(tmp_path):
    train_dir = make_folder(tmp_path / "train", "2_sks dog", 3, "sks dog {i}, sitting")  # 6 train samples
    reg_dir = make_folder(tmp_path / "reg", "1_dog", 4, None, color0=120)  # captions: the class tokens "dog"
    return train_dir, reg_dir


def test_reg_images_are_balanced_to_the_train_samples_like_kohya(reg_data, tmp_path):
    train_dir, reg_dir = reg_data
    ds = load_dataset(train_dir, reg_dir)
    reg = [item for item in ds.items if item.is_reg]
    assert ds.num_train_samples == 6 and ds.num_reg_images == 4
    # kohya: 4 reg images x 1 repeat < 6 train samples -> repeats grow one image at a time: 2, 2, 1, 1
    assert [item.repeats for item in reg] == [2, 2, 1, 1]
    assert ds.num_samples == 12 and sorted(ds.epoch_indices()).count(len(ds.items) - 1) == 1
    assert {item.caption for item in reg} == {"dog"}
    assert ds.reg_dirs == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    assert ds.subsets() == {"2_sks dog": {"n_repeats": 2, "img_count": 3}}
    # more reg than train samples: the extra reg images are left out, with a warning
    many = make_folder(tmp_path / "many", "3_dog", 5, None)
    ds = load_dataset(train_dir, many)
    assert [item.repeats for item in ds.items if item.is_reg] == [3, 3]
    assert ds.num_reg_images == 15 and any("not used" in w for w in ds.warnings)
    with pytest.raises(DatasetError, match="reg_dataset"):
        load_dataset(train_dir, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="reg_dataset"):
        load_dataset(train_dir, str(tmp_path / "empty"))


def test_prior_loss_weight_scales_the_reg_loss(reg_data, monkeypatch):
    train_dir, reg_dir = reg_data
    seen = record_samples(monkeypatch)
    losses = {}
    for w in (0.0, 1.0, 2.0):
        result, _ = run(dataset=train_dir, reg_dataset=reg_dir, prior_loss_weight=w, steps=1, batch_size=4,
                        trigger_word="sks")
        losses[w] = result.losses[0]
    first = seen[:4]
    assert any(r for *_, r, _s in first) and not all(r for *_, r, _s in first), "a batch mixes train and reg"
    # the step-1 loss is train + w * reg: linear in w, with a non-zero reg part
    assert losses[1.0] - losses[0.0] == pytest.approx(losses[2.0] - losses[1.0], rel=1e-4)
    assert abs(losses[1.0] - losses[0.0]) > 1e-6
    # reg (class) captions never get the trigger word; train captions do
    assert all(c == "dog" for _, _, c, r, _s in seen if r)
    assert all(c.startswith("sks") for _, _, c, r, _s in seen if not r)
    # the weight changes the trained LoRA
    zero, _ = run(dataset=train_dir, reg_dataset=reg_dir, prior_loss_weight=0.0, steps=2)
    one, _ = run(dataset=train_dir, reg_dataset=reg_dir, prior_loss_weight=1.0, steps=2)
    assert any(not torch.equal(zero.lora.tensors[k], one.lora.tensors[k]) for k in one.lora.tensors)
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        cfg(prior_loss_weight=-1.0).validate()


def test_reg_metadata_and_latent_cache(reg_data, tmp_path):
    import json

    train_dir, reg_dir = reg_data
    cache_mod.clear_memory_cache()
    cache_dir = str(tmp_path / "cache")
    first, _ = run(dataset=train_dir, reg_dataset=reg_dir, cache_latents="disk", cache_dir=cache_dir,
                   prior_loss_weight=0.5)
    md = first.lora.metadata
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    assert md["ss_num_reg_images"] == "4" and md["ss_num_train_images"] == "6"
    assert md["ss_prior_loss_weight"] == "0.5"
    assert json.loads(md["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 2, "img_count": 3}}
    # reg latents are cached (keyed by content) like train ones: 3 + 4 files, and a second run skips the VAE
    assert first.stats["vae_calls"] == 7
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]) == 7
    cache_mod.clear_memory_cache()
    second, _ = run(dataset=train_dir, reg_dataset=reg_dir, cache_latents="disk", cache_dir=cache_dir,
                    prior_loss_weight=0.5)
    assert second.stats["vae_calls"] == 0 and second.stats["latent_cache_hits"] == 7
    assert second.losses == first.losses
    plain, _ = run(dataset=train_dir)
    assert "ss_reg_dataset_dirs" not in plain.lora.metadata and plain.lora.metadata["ss_num_reg_images"] == "0"


def test_reg_dataset_path_in_toml_is_relative_to_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('checkpoint = "m.safetensors"\ndataset = "data"\nreg_dataset = "reg"\nprior_loss_weight = 1\n')
    config = TrainConfig.from_toml(str(path)).validate()
    assert config.reg_dataset == str(tmp_path / "reg") and config.prior_loss_weight == 1.0


# ------------------------------------------------------------------ max_token_length

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_long_captions_are_encoded_in_75_token_windows(family):
    base = build_tiny_components(family, seed=0)
    other_tail = OTHER_TAIL
    assert tokenize_chunks(base.tokenizers[0], [LONG], 75)[0, 0].tolist() == \
        tokenize_chunks(base.tokenizers[0], [other_tail], 75)[0, 0].tolist()
    with torch.no_grad():
        short = encode_prompts(base, [LONG, other_tail])
        long = encode_prompts(base, [LONG, other_tail], max_token_length=150)
        longer = encode_prompts(base, [LONG], max_token_length=225)
    # kohya: BOS + 75 per window + the last position -> 152 / 227
    assert short.encoder_hidden_states.shape[1] == 77
    assert long.encoder_hidden_states.shape[1] == 152 and longer.encoder_hidden_states.shape[1] == 227
    # the default truncates: text after 75 tokens has no effect; with 150 it has
    assert torch.equal(short.encoder_hidden_states[0], short.encoder_hidden_states[1])
    assert not torch.allclose(long.encoder_hidden_states[0], long.encoder_hidden_states[1])
    # the first window is the truncated caption
    assert torch.allclose(long.encoder_hidden_states[:, :76], short.encoder_hidden_states[:, :76], atol=1e-6)
    if family == "sdxl":  # pooled from the first window, as kohya does
        assert long.added_cond_kwargs["text_embeds"].shape == short.added_cond_kwargs["text_embeds"].shape
        assert torch.allclose(long.added_cond_kwargs["text_embeds"], short.added_cond_kwargs["text_embeds"],
                              atol=1e-6)
    # each window is wrapped in BOS ... EOS / padding
    ids = tokenize_chunks(base.tokenizers[-1], [LONG], 225)[0]
    assert ids.shape == (3, 77)
    assert (ids[:, 0] == base.tokenizers[-1].bos_token_id).all()
    assert (ids[:, -1] == base.tokenizers[-1].eos_token_id).all()


def test_max_token_length_reaches_training_and_the_text_cache(tmp_path):
    data = make_folder(tmp_path / "long", ".", 2, LONG + ", picture {i}")
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple((kwargs.get("encoder_hidden_states") if len(args) < 3 else args[2]).shape))

    def train_with(**over):
        base = build_tiny_components("sd1", seed=0)
        base.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return run(base=base, dataset=data, steps=1, **over)[0]

    default = train_with()
    assert shapes[-1][1] == 77
    long = train_with(max_token_length=150)
    assert shapes[-1][1] == 152
    assert long.losses != default.losses
    uncached = train_with(max_token_length=150, cache_text_embeddings=False)
    assert uncached.losses == pytest.approx(long.losses, rel=1e-5)
    cache = cache_mod.TextCache(150)
    cache.put("a", torch.zeros(1), None)
    assert cache.get("a") is not None and cache_mod.TextCache(75).key("a") != cache.key("a")
    with pytest.raises(ConfigError, match="max_token_length"):
        cfg(max_token_length=100).validate()


# ------------------------------------------------------------------ wildcards and token warmup

def test_wildcards_pick_one_option_per_sample():
    def pick(caption, n, **kw):
        return process_caption(caption, wildcard=True, generator=sample_generator(3, n, 101), **kw)

    picks = {pick("a {red|green|blue} {circle|square}", n) for n in range(40)}
    assert len(picks) == 6 and all(p.startswith("a ") and "{" not in p for p in picks)
    assert pick("a {red|blue} x", 5) == pick("a {red|blue} x", 5)  # the sample's own generator decides
    assert process_caption("a {red|blue} x") == "a {red|blue} x"  # off: literal
    assert expand_wildcards("{{literal}} {a|a}", lambda n: 0) == "{literal} a"
    lines = {pick("first", n, lines=["first", "second {x|y}"]) for n in range(30)}
    assert lines == {"first", "second x", "second y"}


def test_wildcard_training_varies_captions_and_keeps_runs_equivalent(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "wild", ".", 2, "picture {i}, {{red|blue|green}}, {{round|square}}")
    assert "{red|blue|green}" in load_dataset(data).items[0].caption
    seen = record_samples(monkeypatch)
    events = []
    cached, _ = run(dataset=data, steps=6, enable_wildcard=True, events=events.append)
    by_sample = {n: c for n, _, c, _, _ in seen}
    assert len(set(by_sample.values())) > 2 and not any("{" in c for c in by_sample.values())
    # captions vary: nothing is encoded up front (one encoder call per micro-batch at most)
    assert cached.stats["text_encoder_calls"] <= 6
    seen.clear()
    uncached, _ = run(dataset=data, steps=6, enable_wildcard=True, cache_text_embeddings=False)
    assert uncached.losses == pytest.approx(cached.losses, rel=1e-5)
    # the caption of sample n does not depend on the batch layout (the per-sample generator decides)
    seen.clear()
    run(dataset=data, steps=12, batch_size=1, enable_wildcard=True)
    assert {n: c for n, _, c, _, _ in seen} == by_sample
    seen.clear()
    off, _ = run(dataset=data, steps=1)
    assert all("{red|blue|green}" in c for _, _, c, _, _ in seen)


def test_token_warmup_grows_the_caption(tmp_path, monkeypatch):
    assert warmup_token_count(10, 0, 1, 4) == 1
    assert warmup_token_count(10, 2, 1, 4) == 1 + math.floor(2 * 9 / 4)
    assert warmup_token_count(10, 4, 1, 4) == 10
    assert process_caption("a, b, c, d", keep_tokens=1, step=0, token_warmup_min=1, token_warmup_step=3) == "a, b"
    assert process_caption("a, b, c, d", step=3, token_warmup_min=1, token_warmup_step=3) == "a, b, c, d"
    data = make_folder(tmp_path / "tags", ".", 2, "t{i}, a, b, c, d, e, f, g, h")
    seen = record_samples(monkeypatch)
    run(dataset=data, steps=6, token_warmup_min=1, token_warmup_step=0.5)  # 0.5 of 6 steps: 3
    tags = {}
    for _, _, caption, _, step in seen:
        tags.setdefault(step, set()).add(len(caption.split(",")))
    assert tags[0] == {1} and tags[1] == {3} and tags[2] == {6} and tags[3] == {9} and tags[5] == {9}
    assert cfg(token_warmup_step=0.5, steps=6).token_warmup_steps() == 3
    with pytest.raises(ConfigError, match="token_warmup_step"):
        cfg(token_warmup_step=2.5).validate()


def test_wildcards_warmup_and_reg_resume_bitwise(tmp_path, reg_data):
    train_dir, reg_dir = reg_data
    wild = make_folder(tmp_path / "w", "2_sks dog", 3, "sks dog {i}, {{red|blue}}, {{big|small}}, a, b")
    over = dict(dataset=wild, reg_dataset=reg_dir, enable_wildcard=True, token_warmup_step=3, steps=5,
                output_name="r", prior_loss_weight=0.7, shuffle_caption=True)
    full, _ = run(output_dir=str(tmp_path / "full"), **over)
    events = []
    part, _ = run(output_dir=str(tmp_path / "part"), events=events.append,
                  should_stop=lambda: sum(e["type"] == "step" for e in events) >= 2, **over)
    assert part.steps_done == 2 and part.state_path
    resumed, _ = run(output_dir=str(tmp_path / "part"), resume_from=part.state_path, **over)
    assert resumed.losses == full.losses
    for k in full.lora.tensors:
        assert torch.equal(full.lora.tensors[k], resumed.lora.tensors[k]), k


# ------------------------------------------------------------------ per-prompt sample settings

def test_parse_kohya_prompt_options():
    p = parse_prompt("a dog --n blurry, ugly --w 512 --h 770 --d 42 --l 7.5 --s 28 --ss euler_a --g 3")
    assert (p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.cfg, p.steps, p.sampler) == \
        ("a dog", "blurry, ugly", 512, 768, 42, 7.5, 28, "euler_a")
    assert parse_prompt("just words").seed is None and parse_prompt("x --w 10").width == 64
    for bad, flag in (("a --w wide", "sample_prompts.*--w"), ("a --d -3", "--d"), ("a --ss plms", "plms")):
        with pytest.raises(ConfigError, match=flag):
            cfg(sample_prompts=[bad]).validate()


def test_prompt_settings_are_used_for_samples():
    def sample(prompts, **over):
        events = []
        run(steps=1, sample_every_n_steps=5, sample_prompts=prompts, sample_steps=2, events=events.append, **over)
        event = next(e for e in events if e["type"] == "sample")
        return event, [np.asarray(im, dtype=np.int16) for im in event["images"]]

    event, images = sample(["a red circle --w 64 --h 128 --d 42", "a red circle --d 42 --h 128 --w 64",
                            "a red circle --h 128 --w 64"])
    assert event["prompts"] == ["a red circle"] * 3
    assert [im.shape for im in images] == [(128, 64, 3)] * 3
    assert np.array_equal(images[0], images[1])  # the prompt's own seed, not sample_seed + index
    assert np.abs(images[0] - images[2]).max() > 0
    _, again = sample(["a red circle --w 64 --h 128 --d 42"], sample_seed=99)
    assert np.array_equal(again[0], images[0])
    _, varied = sample(["a red circle --w 64 --h 128 --d 42 --n blue", "a red circle --w 64 --h 128 --d 42 --l 2",
                        "a red circle --w 64 --h 128 --d 42 --s 4", "a red circle --w 64 --h 128 --d 42 --ss euler_a"])
    for i, im in enumerate(varied):
        assert np.abs(im - images[0]).max() > 0, i


def test_long_sample_prompts_use_the_token_windows():
    long_a = LONG + ", red"
    long_b = OTHER_TAIL + ", red"

    def pair(**over):
        events = []
        run(steps=1, sample_every_n_steps=5, sample_prompts=[long_a + " --d 1", long_b + " --d 1"], sample_steps=2,
            events=events.append, **over)
        a, b = (np.asarray(im, dtype=np.int16) for im in next(e for e in events if e["type"] == "sample")["images"])
        return a, b

    a, b = pair()
    assert np.array_equal(a, b)  # truncated at 75 tokens: the same image
    a, b = pair(max_token_length=150)
    assert np.abs(a - b).max() > 0


# ------------------------------------------------------------------ fp8_base and torch_compile

def test_fp8_base_stores_frozen_weights_in_float8_and_learns():
    result, base = run(fp8_base=True, steps=4, learning_rate=1e-2, target="full", conv_rank=2)
    frozen = [(n, m) for n, m in base.unet.named_modules()
              if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and "lora_" not in n]
    assert frozen and all(m.weight.dtype == FP8_DTYPE for _, m in frozen)
    assert any(n.endswith("base_layer") for n, _ in frozen)  # the LoRA-wrapped layers' own weights too
    te_linear = [m for m in base.text_encoders[0].modules() if type(m) is torch.nn.Linear]
    assert te_linear and all(m.weight.dtype == FP8_DTYPE for m in te_linear)
    lora = [p for n, p in base.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(math.isfinite(v) for v in result.losses)
    # it learns what the full-precision run learns
    reference, _ = run(steps=4, learning_rate=1e-2, target="full", conv_rank=2)
    ups = [k for k in result.lora.tensors if k.endswith("lora_up.weight")]
    a = torch.cat([result.lora.tensors[k].flatten() for k in ups])
    b = torch.cat([reference.lora.tensors[k].flatten() for k in ups])
    assert a.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert not torch.equal(a, b)  # the float8 weights were used
    bf16, _ = run(fp8_base=True, precision="bf16")
    assert all(math.isfinite(v) for v in bf16.losses)
    with pytest.raises(ConfigError, match="fp8_base"):
        cfg(fp8_base=True, adapter="dora").validate()


def test_torch_compile_compiles_the_unet(monkeypatch):
    calls = []

    def fake_compile(fn, *args, **kwargs):
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled, base = run(torch_compile=True)
    assert len(calls) == 1 and getattr(calls[0], "__self__", None) is base.unet
    assert base.unet._compiled_call_impl is not None
    off, base_off = run()
    assert base_off.unet._compiled_call_impl is None and len(calls) == 1  # off: nothing compiled
    assert off.losses == compiled.losses  # the (identity) compiled call is what ran: same numbers

    import torch._dynamo as dynamo

    monkeypatch.setattr(dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(TrainingError, match="torch_compile"):
        run(torch_compile=True)


def test_torch_compile_failure_names_the_option(monkeypatch):
    import torch._dynamo.exc as dexc

    class Failed(dexc.TorchDynamoException):
        pass

    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise Failed("no backend")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match="torch_compile.*no backend"):
        run(torch_compile=True)
