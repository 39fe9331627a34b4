"""Our kohya files through diffusers' own ``load_lora_weights``: the pipeline's UNet and text encoders then
compute what the trained (peft-adapted) models compute.

Where diffusers does not support the type (documented in the README, lora-format.md §8): LoHa and LoKr
(``load_lora_adapter`` raises), DoRA (``dora_scale`` is dropped with a warning). A DoRA baked into a plain
LoRA (``bake="dora"``) loads; its outputs match up to the reported bake error.
"""

import copy

import pytest
import torch

from comfyui_lora_trainer.training.formats import LoraWeights, RunInfo, export_kohya, make_metadata, save_lora_file

UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _variant(name):
    from peft import LoraConfig

    return {
        "lora": (dict(r=4, lora_alpha=8, use_rslora=False, alpha_pattern={"ff.net.2": 2.0}), UNET_LINEAR),
        "locon": (dict(r=4, lora_alpha=4, rank_pattern={"conv1": 2}), UNET_LINEAR + UNET_CONV),
        "dora_baked": (dict(r=4, lora_alpha=8, use_dora=True), UNET_LINEAR),
    }[name], LoraConfig


def _pipeline(family, base):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet,
            scheduler=base.noise_scheduler)
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
        scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _unet_out(unet, family, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    kw = {}
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kw).sample


def _te_out(te):
    ids = torch.arange(2, 12).unsqueeze(0) % te.config.vocab_size
    with torch.no_grad():
        return te(ids, output_hidden_states=True).hidden_states[-2]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["lora", "locon", "dora_baked"])
def test_diffusers_load_lora_weights_reproduces_trained_outputs(tmp_path, family, variant):
    from comfyui_lora_trainer.training.models import build_tiny_components

    (kw, unet_targets), LoraConfig = _variant(variant)
    trained = build_tiny_components(family, seed=0)
    torch.manual_seed(3)
    unet = trained.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(target_modules=unet_targets, init_lora_weights=False, **kw))
    for te in trained.text_encoders:
        te.requires_grad_(False).add_adapter(LoraConfig(target_modules=TE, init_lora_weights=False,
                                                        **{k: v for k, v in kw.items() if k != "alpha_pattern"}))
    if variant == "dora_baked":
        for m in unet.modules():
            mag = getattr(m, "lora_magnitude_vector", None)
            if mag is not None and "default" in mag:
                mag["default"].weight.data *= 1 + 0.2 * torch.rand_like(mag["default"].weight)
    result = export_kohya(family, unet=unet, text_encoders=trained.text_encoders,
                          bake="dora" if variant == "dora_baked" else "none", bake_rank=64)
    path = save_lora_file(tmp_path / "l.safetensors",
                          LoraWeights(result.tensors, make_metadata(RunInfo(family=family)), family))

    fresh = build_tiny_components(family, seed=0)
    before = _unet_out(fresh.unet, family)
    pipe = _pipeline(family, fresh)
    pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
    tol = 1e-4
    after = _unet_out(pipe.unet, family)
    assert _rel(after, _unet_out(unet, family)) < tol
    assert _rel(after, before) > 100 * tol  # the LoRA matters, so the match above means something
    for te_loaded, te_trained in zip([pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else []),
                                     trained.text_encoders):
        assert _rel(_te_out(te_loaded), _te_out(te_trained)) < tol
