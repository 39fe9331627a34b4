"""Issue 16 groundwork in a real ComfyUI (in-process): nodes/comfy_model.py on tiny models of every DiT family
ComfyUI loads, built from ComfyUI's own classes and loaded by ComfyUI's own ``load_diffusion_model_state_dict``
(tests/integration/comfy_tiny.py: detection reads the sizes from the shapes and is told only those it fixes).

For each family: the provider names the family and finds the expected adapter modules; a forward pass runs on
the CPU and agrees with ComfyUI's denoised output; a minimal training run (a STAND-IN for the real loop, which
gets wired once the loop reshape lands) with a peft LoRA on those modules and the flow objective of
training/flow.py lowers the loss on a tiny overfit set; the file written with formats/names.py's names loads
through ComfyUI's own lora loading with zero "lora key not loaded" and reproduces the trained model's output
within 1e-5 (fp32).

Text encoders: none are built. The tiny models read conditioning tensors of the right width passed directly
(``TextConditioning``: a [1, 7, 64] context and the extras the family's real encoders give: a [1, 32]
pooled vector for Flux/SD3, ``pooled_output = None`` for Chroma, the token mask for Lumina2), i.e. what
``CLIP.encode_from_tokens_scheduled`` returns; ``ComfyBaseModel.encode_text`` is checked with a stand-in CLIP.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
import torch

FAMILY_TARGETS = {  # family -> (adapter modules of the tiny model, sample paths that must be among them)
    "flux-dev": (26, ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "double_blocks.0.img_mod.lin",
                      "single_blocks.1.linear1", "single_blocks.0.modulation.lin"]),
    "flux-schnell": (26, ["double_blocks.1.txt_attn.proj", "single_blocks.0.linear2"]),
    "sd3": (17, ["joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.x_block.mlp.fc2",
                 "joint_blocks.1.x_block.adaLN_modulation.1", "joint_blocks.1.context_block.attn.qkv"]),
    "sd3.5-medium": (19, ["joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.attn2.proj",
                          "joint_blocks.1.x_block.attn.qkv"]),
    "chroma": (20, ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.1.linear2"]),
    "lumina2": (23, ["layers.0.attention.qkv", "layers.1.feed_forward.w3", "noise_refiner.0.adaLN_modulation.1",
                     "context_refiner.0.attention.out"]),
    "qwen-image": (28, ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
                        "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.1.txt_mod.1"]),
}
NOT_TARGETS = re.compile(r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer|x_embedder|t_embedder|"
                         r"y_embedder|context_embedder|cap_embedder|distilled_guidance_layer|norm_out|proj_out|"
                         r"time_text_embed)")

STEPS = 30
RANK = 4
SAMPLE_DATASET = str(Path(__file__).resolve().parents[2] / "training" / "sample_dataset")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # on a shared CPU, two OpenMP threads wait on each other at every tiny matmul (20x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _provider(tiny, **kw):
    """A ComfyBaseModel on a fresh load of ``tiny`` (loaded under inference mode, as ComfyUI's loader
    nodes run), prepared for training."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.host import ComfyHost

    with torch.inference_mode():
        patcher = comfy_tiny.load(tiny)
    if kw.pop("stand_ins", False):  # the graph's CLIP and VAE, as stand-ins that fit the tiny model
        latent_format = patcher.model.latent_format
        kw.update(clip=comfy_tiny.StandInClip(tiny),
                  vae=comfy_tiny.StandInVae(latent_format.latent_channels,
                                            getattr(latent_format, "latent_dimensions", 2)))
    provider = ComfyHost().base_model(patcher, **kw)  # the node layer's way in
    provider.prepare()
    return provider


def _overfit_set(provider, tiny, seed=0):
    """Two latents with fixed noise and noise levels (sigmoid sampling of training/flow.py, one generator
    per sample) and their conditionings."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.comfy_model import TextConditioning
    from comfyui_lora_trainer.training.flow import FlowTimesteps, sample_sigmas

    shape = (provider.latent_channels,) + (1,) * (provider.latent_dimensions - 2) + (8, 8)
    x0, noise, sigma, conds = [], [], [], []
    for i in range(2):
        g = torch.Generator().manual_seed(seed * 100 + i)
        x0.append(torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
        sigma.append(sample_sigmas(1, FlowTimesteps(timestep_sampling="sigmoid"), g))
        conds.append(TextConditioning(torch.randn(1, 7, comfy_tiny.CONTEXT_DIM, generator=g),
                                      comfy_tiny.text_extras(tiny, 7, g)))
    return torch.stack(x0), torch.stack(noise), torch.cat(sigma), conds


def _flow_loss(provider, x0, noise, sigma, conds):
    from comfyui_lora_trainer.training.flow import loss_weighting, noisy_input, velocity_target

    pred = provider.forward(noisy_input(x0, noise, sigma), sigma, conds)
    per_sample = ((pred.float() - velocity_target(x0, noise)) ** 2).flatten(1).mean(1)
    return (loss_weighting(sigma, "none") * per_sample).mean()


def _train_loop(provider, tmp_path, steps=STEPS, events=None, should_stop=None, **settings):
    """The real training loop (training/loop.py) on the provider, as Train LoRA runs it with a MODEL input: the
    bundled sample dataset through the stand-in CLIP and VAE, 64 px, every adapter target of the family, the
    whole dataset as the validation set (fixed timesteps and noise: a loss that only falls when the model
    fits). Returns the TrainResult."""
    from comfyui_lora_trainer.training.config import TrainConfig
    from comfyui_lora_trainer.training.loop import train

    values = dict(dataset=SAMPLE_DATASET, output_dir=str(tmp_path), output_name=f"{provider.family}_lora",
                  steps=steps, rank=RANK, alpha=float(RANK), learning_rate=1e-2, resolution=64, batch_size=2, seed=0,
                  device="cpu", precision="fp32", target="full", validation_dataset=SAMPLE_DATASET,
                  validate_every_n_steps=steps, timestep_sampling="sigmoid")
    values.update(settings)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return train(TrainConfig(**values), base=provider, events=events, should_stop=should_stop)


@pytest.fixture(scope="module")
def figures():
    out = {}
    yield out
    if out:
        sys.stderr.write("\n[comfy_model] family: loss ratio, max |diff| in ComfyUI, keys loaded, "
                         "fields detection was told\n")
        for family, (ratio, diff, keys, told) in out.items():
            sys.stderr.write(f"[comfy_model] {family}: {ratio:.3f}, {diff:.2e}, {keys}, {sorted(told) or '-'}\n")


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_family_loads_trains_and_round_trips(comfy_lib, family, tmp_path, figures):
    import comfy_tiny

    from comfyui_lora_trainer.training.formats.families import (BASE_MODEL_VERSION, KOHYA_NETWORK_MODULE,
                                                                 MODELSPEC_ARCHITECTURE,
                                                                 family_from_metadata)

    tiny = comfy_tiny.BUILDERS[family]()
    provider = _provider(tiny, stand_ins=True)
    assert provider.family == family and provider.parameterisation == "flow"

    # adapter modules: the family's transformer-block Linears, none of the embedders or the final layer
    count, samples = FAMILY_TARGETS[family]
    targets = provider.adapter_targets()
    assert len(targets) == count and set(samples) <= set(targets), sorted(targets)
    assert not [t for t in targets if NOT_TARGETS.match(t)]
    attention = provider.adapter_targets("attention")
    assert 0 < len(attention) < count and set(attention) <= set(targets)

    # the training loop lowers the validation loss of the dataset it trains on
    result = _train_loop(provider, tmp_path)
    (_, before), (_, after) = result.validation[0], result.validation[-1]
    assert after < 0.97 * before, result.validation  # Lumina2, whose blocks RMS-normalise what they add, is slowest

    # the file it wrote: our names and metadata, read back by ComfyUI's own loader
    lora, metadata = comfy_lib.utils.load_torch_file(result.path, safe_load=True, return_metadata=True)
    assert {k.split(".")[0] for k in lora} == {provider.lora_name(t) for t in targets}
    assert metadata["modelspec.architecture"] == MODELSPEC_ARCHITECTURE[family]
    assert metadata["ss_base_model_version"] == BASE_MODEL_VERSION[family]
    assert family_from_metadata(metadata) == family
    assert metadata["ss_timestep_sampling"] == "sigmoid" and metadata["ss_network_dim"] == str(RANK)
    assert ("ss_guidance_scale" in metadata) == (provider.guidance is not None)
    assert metadata["ss_network_module"] == KOHYA_NETWORK_MODULE.get(family, "networks.lora")
    data = _overfit_set(provider, tiny)

    fresh = _provider(tiny)
    x0, noise, sigma, conds = data
    x = fresh.noisy_input(x0, noise, sigma)
    with torch.no_grad():
        base_out = fresh.forward(x, sigma, conds)  # before the patches below go into the shared module
    # ComfyUI's patched model (the LoRA's patches in the weights as its loader applies them) gives the
    # trained model's output
    patched_provider = comfy_tiny.apply_lora_file(comfy_lib, fresh.patcher, lora)
    patched = patched_provider.patcher
    assert len(patched.patches) == len(targets)
    assert {k[len("diffusion_model."):-len(".weight")] for k in patched.patches} == set(targets)
    with torch.no_grad():
        trained_out = provider.forward(x, sigma, conds)
        comfy_out = patched_provider.forward(x, sigma, conds)
    diff = float((trained_out - comfy_out).abs().max())
    assert diff < 1e-5, diff
    assert float((trained_out - base_out).abs().max()) > 100 * max(diff, 1e-7)  # the LoRA changes the output

    # after training in place, ComfyUI's model is its own again: same modules and keys, the base output
    provider.release()  # what Train LoRA does after a run
    assert not any(".lora_" in name for name in provider.diffusion_model.state_dict())
    assert not any(p.requires_grad for p in provider.diffusion_model.parameters())
    assert provider.diffusion_model.state_dict().keys() == fresh.diffusion_model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(provider.forward(x, sigma, conds), base_out, atol=1e-6, rtol=0)
    figures[family] = (after / before, diff, f"{len(patched.patches)}/{len(targets)}", tiny.told)


def test_forward_equals_comfyui_denoised_and_guidance_reaches_flux_dev(comfy_lib):
    """The output the provider returns is what ComfyUI's apply_model turns into its denoised latent, and the
    Flux-dev guidance input (kohya's --guidance_scale) goes through ComfyUI's extra_conds: changing it
    changes the output; Flux-schnell has no guidance input."""
    import comfy_tiny

    tiny = comfy_tiny.BUILDERS["flux-dev"]()
    one = _provider(tiny)
    three = _provider(tiny, guidance=3.5)
    assert one.guidance == 1.0 and three.guidance == 3.5
    x0, noise, sigma, conds = _overfit_set(one, tiny)
    with torch.no_grad():
        x = one.noisy_input(x0, noise, sigma)
        out = one.forward(x, sigma, conds)
        (indices, model_conds), = one._model_conds(x, conds)  # same-length captions: one batch
        assert indices == [0, 1]
        denoised = one.base.apply_model(x, sigma, **model_conds)
        torch.testing.assert_close(x - out * sigma.view(-1, 1, 1, 1), denoised, atol=1e-5, rtol=1e-5)
        assert float((three.forward(x, sigma, conds) - out).abs().max()) > 1e-4
    schnell = _provider(comfy_tiny.BUILDERS["flux-schnell"]())
    assert schnell.guidance is None


def test_inference_mode_weights_become_trainable_without_a_second_model(comfy_lib):
    """ComfyUI's loaders run in inference mode; autograd cannot save such weights. prepare() swaps them for
    ordinary tensors one by one (the module objects stay ComfyUI's), and a backward pass then works."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.comfy_model import ComfyBaseModel

    tiny = comfy_tiny.BUILDERS["sd3"]()
    with torch.inference_mode():
        patcher = comfy_tiny.load(tiny)
    provider = ComfyBaseModel(patcher)
    modules_before = dict(provider.diffusion_model.named_modules())
    assert any(p.is_inference() for p in provider.diffusion_model.parameters())
    provider.prepare()
    assert not any(p.is_inference() for p in provider.diffusion_model.parameters())
    assert all(m is modules_before[n] for n, m in provider.diffusion_model.named_modules())
    x0, noise, sigma, conds = _overfit_set(provider, tiny)
    layer = provider.adapter_targets()["joint_blocks.0.x_block.attn.qkv"]
    delta = torch.zeros_like(layer.weight, requires_grad=True)
    handle = layer.register_forward_hook(lambda m, a, out: out + torch.nn.functional.linear(a[0], delta))
    try:
        _flow_loss(provider, x0, noise, sigma, conds).backward()
    finally:
        handle.remove()
    assert delta.grad is not None and float(delta.grad.abs().sum()) > 0


def test_untested_family_is_refused_by_name(comfy_lib):
    """A model whose family has no test is refused with its name and the tested list; so is an X0 model."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes import comfy_model
    from comfyui_lora_trainer.nodes.spec import NodeError

    with torch.inference_mode():
        patcher = comfy_tiny.load(comfy_tiny.BUILDERS["lumina2"]())
    tested = comfy_model.TESTED
    try:
        comfy_model.TESTED = tuple(f for f in tested if f != "lumina2")
        with pytest.raises(NodeError, match=r"Lumina Image 2\.0 is not tested.*tested on ComfyUI's models: .*Flux\.1 dev"):
            comfy_model.ComfyBaseModel(patcher)
    finally:
        comfy_model.TESTED = tested
    patcher.model.model_config = type("Flux2", (), {"unet_config": {}})()
    with pytest.raises(NodeError, match="a Flux2 model is not tested"):
        comfy_model.ComfyBaseModel(patcher)


def test_encode_text_keeps_what_the_model_reads(comfy_lib):
    """encode_text goes through CLIP.tokenize + encode_from_tokens_scheduled (a stand-in CLIP with ComfyUI's
    CONDITIONING structure here) and keeps the cond and the extras the family's model reads."""
    import comfy_tiny

    class StandInClip:
        def tokenize(self, text):
            return {"t5xxl": [[(len(text), 1.0)]]}

        def encode_from_tokens_scheduled(self, tokens):
            n = tokens["t5xxl"][0][0][0]
            return [[torch.full((1, 3, comfy_tiny.CONTEXT_DIM), float(n)),
                     {"pooled_output": torch.ones(1, comfy_tiny.POOLED_DIM), "hooks": object()}]]

    provider = _provider(comfy_tiny.BUILDERS["flux-dev"](), clip=StandInClip())
    a, b = provider.encode_text(["a photo", "a photo of sks"])
    assert float(a.cond[0, 0, 0]) == 7.0 and float(b.cond[0, 0, 0]) == 14.0
    assert set(a.extras) == {"pooled_output"} and not a.cond.is_inference()
    x0, noise, sigma, _ = _overfit_set(provider, comfy_tiny.BUILDERS["flux-dev"]())
    with torch.no_grad():
        out = provider.forward(provider.noisy_input(x0, noise, sigma), sigma, [a, b])
    assert out.shape == x0.shape and torch.isfinite(out).all()


NO_VALIDATION = dict(validation_dataset="", validate_every_n_steps=0)


@pytest.mark.parametrize("family", ["flux-dev", "qwen-image"])
def test_cancel_and_resume_equal_an_uninterrupted_run_bitwise(comfy_lib, family, tmp_path):
    """Cancel after step 3 (the node's should_stop), then a run resumed from the state it left, on a fresh load
    of the model: the same file and losses, to the bit, as 6 uninterrupted steps (CPU)."""
    import comfy_tiny
    from safetensors.torch import load_file

    tiny = comfy_tiny.BUILDERS[family]()
    common = dict(steps=6, save_state_on_stop=True, **NO_VALIDATION)

    def run(folder, **settings):
        provider = _provider(tiny, stand_ins=True)
        try:
            return _train_loop(provider, tmp_path / folder, **common, **settings)
        finally:
            provider.release()

    whole = run("whole")
    steps = []
    cut = run("cut", events=lambda e: steps.append(e["step"]) if e["type"] == "step" else None,
              should_stop=lambda: len(steps) >= 3)
    assert cut.stopped_early and cut.steps_done == 3 and cut.state_path and "_interrupted_step3" in cut.path
    resumed = run("cut", resume_from=cut.state_path)
    assert resumed.steps_done == 6 and resumed.losses == whole.losses
    a, b = load_file(whole.path), load_file(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_file(cut.path)[k]) for k in a)  # steps 4-6 changed the weights


def test_samples_come_from_comfyuis_sampler_on_the_model_being_trained(comfy_lib, tmp_path, monkeypatch):
    """sample_every_n_steps draws with ComfyUI's own sampler (comfy.sample.sample on the MODEL, the VAE's
    decode), at the size a prompt asks for, and the trained adapters change what it draws."""
    import comfy.sample
    import comfy_tiny
    import numpy as np

    calls = []
    real = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    provider = _provider(comfy_tiny.BUILDERS["flux-dev"](), stand_ins=True)
    samples = []
    try:
        _train_loop(provider, tmp_path, steps=6, sample_every_n_steps=6, sample_steps=2,
                    sample_prompts=["red circle --w 96 --h 64"], learning_rate=5e-2,
                    events=lambda e: samples.append(e) if e["type"] == "sample" else None, **NO_VALIDATION)
    finally:
        provider.release()
    assert [e["step"] for e in samples] == [0, 6] and calls and all(m is provider.patcher for m in calls)
    first, last = samples[0]["images"][0], samples[1]["images"][0]
    assert first.size == last.size == (96, 64)
    assert np.abs(np.asarray(first, dtype=float) - np.asarray(last, dtype=float)).max() > 0
    assert all(os.path.isfile(p) for e in samples for p in e["paths"])


@pytest.mark.parametrize("setting", [{"train_text_encoder": True}, {"quantize_base": "4bit"}])
def test_settings_the_model_input_cannot_take_are_refused_by_name(comfy_lib, tmp_path, setting):
    import comfy_tiny

    from comfyui_lora_trainer.training.loop import TrainingError

    provider = _provider(comfy_tiny.BUILDERS["sd3"](), stand_ins=True)
    key = next(iter(setting))
    with pytest.raises(TrainingError, match=key):
        _train_loop(provider, tmp_path, **setting, **NO_VALIDATION)
    provider.release()


@pytest.mark.parametrize("family,swap", [("flux-dev", 2), ("qwen-image", 1)])
def test_checkpointing_and_block_swap_change_nothing_but_memory(comfy_lib, family, swap, tmp_path):
    """Per-block gradient checkpointing and block swap on ComfyUI's own model, through the training loop: the
    same LoRA and losses to the bit as a plain run (CPU), and release() hands the blocks back unwrapped."""
    import comfy_tiny
    from safetensors.torch import load_file

    tiny = comfy_tiny.BUILDERS[family]()

    def run(folder, **settings):
        provider = _provider(tiny, stand_ins=True)
        try:
            result = _train_loop(provider, tmp_path / folder, steps=3, **NO_VALIDATION, **settings)
        finally:
            provider.release()
        assert all("forward" not in vars(block) for block in provider._blocks())  # no wrapper left behind
        return result

    plain = run("plain")
    wrapped = run("wrapped", gradient_checkpointing=True, blocks_to_swap=swap)
    assert wrapped.losses == plain.losses
    a, b = load_file(plain.path), load_file(wrapped.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_memory_estimate_reads_the_model_input_and_picks_blocks_to_swap(comfy_lib, tmp_path):
    """Train LoRA's pre-flight on a model input: the estimate takes the model's own shapes and weight bytes;
    ``blocks_to_swap = auto`` becomes the count that fits a device between the unswapped and the fully swapped
    peak; without swap the same device refuses the run with the estimator's advice."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.comfy_model import ComfyBaseModel
    from comfyui_lora_trainer.nodes.estimate import DitShape, Settings, estimate
    from comfyui_lora_trainer.nodes.host import ComfyHost
    from comfyui_lora_trainer.nodes.spec import NodeError
    from comfyui_lora_trainer.nodes.train import preflight
    from comfyui_lora_trainer.training.config import TrainConfig

    class SmallGpu(ComfyHost):  # ComfyUI's host, with a device of ``free`` bytes
        def __init__(self, free):
            self.free = free

        def device_memory(self):
            return {"free": self.free, "total": self.free, "type": "cuda", "name": "test GPU"}

        def free_memory(self):
            pass

    provider = _provider(comfy_tiny.BUILDERS["flux-dev"](), stand_ins=True)
    shape = provider.memory_shape()
    assert isinstance(shape, DitShape) and shape.family == "flux-dev"
    assert shape.params == sum(p.numel() for p in provider.diffusion_model.parameters())
    settings = Settings(resolution=64, batch_size=1, rank=4, precision="bf16")
    plain = estimate(shape, settings, None, "cuda").peak_bytes
    swapped = estimate(shape, dataclasses.replace(settings, blocks_to_swap=shape.max_blocks_to_swap()), None,
                       "cuda").peak_bytes
    assert swapped < plain
    device = SmallGpu((plain + swapped) // 2)

    def config(blocks_to_swap):
        return TrainConfig(dataset=SAMPLE_DATASET, output_dir=str(tmp_path), output_name="x", steps=2, rank=4,
                           resolution=64, batch_size=1, precision="bf16", blocks_to_swap=blocks_to_swap)

    auto = config("auto")
    assert preflight(device, auto, None, base=provider).fits
    assert 0 < auto.blocks_to_swap <= shape.max_blocks_to_swap()
    assert isinstance(provider, ComfyBaseModel)
    with pytest.raises(NodeError, match=r"would need about .* Change:\n  - .*\(fits\)"):
        preflight(device, config(0), None, base=provider)
    provider.release()


def test_caption_augmentation_encodes_every_step_with_the_text_encoders_kept_loaded(comfy_lib, tmp_path):
    """shuffle_caption on a model input: each step's captions go through the graph's CLIP again, which is
    loaded beside the model once (said in the log with its size) instead of swapped in at every step."""
    import comfy_tiny

    provider = _provider(comfy_tiny.BUILDERS["flux-schnell"](), stand_ins=True)
    logs, calls = [], {}

    def events(e):
        if e["type"] == "log":
            logs.append(e["message"])
        calls.setdefault(e["type"], provider.clip.calls)  # the CLIP's encodes when each event first came

    try:
        _train_loop(provider, tmp_path, steps=3, shuffle_caption=True, events=events, **NO_VALIDATION)
    finally:
        provider.release()
    assert calls["start"] == 0 and calls["done"] > 0  # nothing encoded up front; the steps encode their captions
    assert any(m.startswith("caption augmentation: the captions are encoded at every step") and "GiB more" in m
               for m in logs), logs


def test_a_model_loaded_in_fp8_trains_with_its_weights_kept_in_fp8(comfy_lib, tmp_path):
    """Load Diffusion Model with weight_dtype fp8_e4m3fn: ComfyUI stores the weights in float8 and casts them per
    operation; training keeps them so (the adapters train in fp32 beside them) and the loss falls."""
    import comfy_tiny

    from comfyui_lora_trainer.nodes.host import ComfyHost

    tiny = comfy_tiny.BUILDERS["flux-dev"]()
    with torch.inference_mode():
        patcher = comfy_tiny.load(tiny, torch.float8_e4m3fn)
    latent = patcher.model.latent_format
    provider = ComfyHost().base_model(patcher, comfy_tiny.StandInClip(tiny),
                                      comfy_tiny.StandInVae(latent.latent_channels))
    frozen_dtypes = []

    def events(e):
        if e["type"] == "step":
            frozen_dtypes.append({p.dtype for p in provider.diffusion_model.parameters() if not p.requires_grad})

    try:
        result = _train_loop(provider, tmp_path, steps=10, events=events)
        trained = {p.dtype for p in provider.diffusion_model.parameters() if p.requires_grad}
    finally:
        provider.release()
    assert all(d == {torch.float8_e4m3fn} for d in frozen_dtypes) and trained == {torch.float32}
    (_, before), (_, after) = result.validation[0], result.validation[-1]
    assert after < 0.9 * before, result.validation


def test_z_image_trains_and_round_trips_where_comfyui_has_it(comfy_lib, tmp_path, figures):
    """Z-Image (ComfyUI 0.33; 0.3.64 predates it and must not know it): a tiny one in ComfyUI's own ZImage
    classes trains through the loop with its modulation layers among the targets, and its file loads back
    through ComfyUI's LoRA loader with every key and the trained model's output."""
    import comfy.supported_models
    import comfy_tiny

    from comfyui_lora_trainer.nodes.host import ComfyHost

    with torch.inference_mode():
        patcher = comfy_tiny.z_image_patcher()
    if patcher is None:  # the oldest supported ComfyUI: no Z-Image to train (the node refuses nothing it lacks)
        assert not hasattr(comfy.supported_models, "ZImage") and comfy_lib.sd is not None
        return
    tiny = comfy_tiny.TinyModel("z-image", {}, {}, None)
    provider = ComfyHost().base_model(patcher, comfy_tiny.StandInClip(tiny), comfy_tiny.StandInVae(16))
    assert provider.family == "z-image" and provider.parameterisation == "flow"
    targets = provider.adapter_targets()
    assert {"layers.0.adaLN_modulation.0", "layers.1.attention.qkv", "noise_refiner.0.feed_forward.w2"} <= set(targets)
    result = _train_loop(provider, tmp_path)
    (_, before), (_, after) = result.validation[0], result.validation[-1]
    assert after < 0.97 * before, result.validation
    lora = comfy_lib.utils.load_torch_file(result.path, safe_load=True)
    assert {k.split(".")[0] for k in lora} == {provider.lora_name(t) for t in targets}
    x0, noise, sigma, _ = _overfit_set(provider, tiny)
    conds = provider.encode_text(["shapetoy, a red circle", "a blue square"])  # 4 and 3 tokens: two calls
    x = provider.noisy_input(x0, noise, sigma)
    with torch.no_grad():
        trained = provider.forward(x, sigma, conds)
    provider.release()
    with torch.inference_mode():
        fresh = comfy_tiny.z_image_patcher()
    loaded_provider = comfy_tiny.apply_lora_file(comfy_lib, fresh, lora)
    patches = len(loaded_provider.patcher.patches)
    assert patches == len(targets)
    with torch.no_grad():
        diff = float((trained - loaded_provider.forward(x, sigma, conds)).abs().max())
    assert diff < 1e-5, diff
    figures["z-image"] = (after / before, diff, f"{patches}/{len(targets)}", {})
