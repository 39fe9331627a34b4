"""Our kohya files through diffusers' own ``load_lora_weights``: the pipeline's UNet and text encoders then
compute what the trained (peft-adapted) models compute.

Where diffusers does not support the type (the "Where each type loads" table of docs/formats.md; these tests keep it
true): LoHa and LoKr files make ``load_lora_weights`` raise ValueError in its kohya key converter (nothing is
loaded); DoRA files load with ``dora_scale`` dropped (a logged warning), i.e. as their plain LoRA part. Baked into
plain LoRA (``bake="dora"``/``"all"``) they load, each module's change equal to the trained one up to the
reported bake error.
"""

import copy

import pytest
import torch

from comfyui_lora_trainer.training.adapters import add_adapter
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
    add_adapter(unet, LoraConfig(target_modules=unet_targets, init_lora_weights=False, **kw))
    for te in trained.text_encoders:
        add_adapter(te.requires_grad_(False), LoraConfig(target_modules=TE, init_lora_weights=False,
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


# ------------------------------------------------------------------ what diffusers does with LyCORIS types

LYCORIS = {
    "loha": lambda peft, t: peft.LoHaConfig(r=3, alpha=6, target_modules=t, init_weights=False),
    "lokr": lambda peft, t: peft.LoKrConfig(r=2, alpha=4, target_modules=t, init_weights=False, decompose_both=True),
    "lokr_full": lambda peft, t: peft.LoKrConfig(r=64, alpha=4, target_modules=t, init_weights=False),
    "dora": lambda peft, t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False,
                                            use_dora=True),
}


def _trained(family, variant):
    import peft

    from comfyui_lora_trainer.training.models import build_tiny_components

    base = build_tiny_components(family, seed=0)
    torch.manual_seed(3)
    add_adapter(base.unet.requires_grad_(False), LYCORIS[variant](peft, UNET_LINEAR + ["conv1", "conv2"]))
    for te in base.text_encoders:
        add_adapter(te.requires_grad_(False), LYCORIS[variant](peft, TE))
    if variant == "dora":  # a trained magnitude: otherwise DoRA == its plain LoRA
        for m in list(base.unet.modules()) + [x for te in base.text_encoders for x in te.modules()]:
            mag = getattr(m, "lora_magnitude_vector", None)
            if mag is not None and "default" in mag:
                mag["default"].weight.data *= 1 + 0.3 * torch.rand_like(mag["default"].weight)
    return base


def _save(tmp_path, family, tensors, name="l.safetensors"):
    save_lora_file(tmp_path / name, LoraWeights(tensors, make_metadata(RunInfo(family=family)), family))
    return name


def _loaded_pipe(tmp_path, family, name):
    from comfyui_lora_trainer.training.models import build_tiny_components

    pipe = _pipeline(family, build_tiny_components(family, seed=0))
    pipe.load_lora_weights(str(tmp_path), weight_name=name)
    return pipe


def _layer_changes(models) -> dict:
    """(model index, module path) -> the weight change of each peft layer (any adapter name; DoRA: merged - base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for i, model in enumerate(models):
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer) or not layer.active_adapters:
                continue
            adapter = layer.active_adapters[0]
            w0 = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[adapter])
            out[(i, path)] = layer.get_base_layer().weight.detach() - w0
            layer.unmerge()
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_full"])
def test_diffusers_refuses_raw_loha_and_lokr_files(tmp_path, family, variant):
    """docs/formats.md: diffusers' ``load_lora_weights`` cannot load our LoHa/LoKr exports. It raises in its kohya key
    converter, naming the LyCORIS keys it cannot rename, and leaves the UNet without an adapter."""
    trained = _trained(family, variant)
    tensors = export_kohya(family, unet=trained.unet, text_encoders=trained.text_encoders).tensors
    name = _save(tmp_path, family, tensors)
    from comfyui_lora_trainer.training.models import build_tiny_components

    fresh = build_tiny_components(family, seed=0)
    pipe = _pipeline(family, fresh)
    before = _unet_out(fresh.unet, family)
    with pytest.raises(ValueError, match=r"(?s)have not been correctly renamed.*\.(hada_w1_a|lokr_w1)"):
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
    assert not getattr(pipe.unet, "peft_config", None)
    assert torch.equal(_unet_out(pipe.unet, family), before)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_drops_dora_scale_and_loads_the_plain_lora_part(tmp_path, family):
    """docs/formats.md: diffusers drops ``dora_scale`` (with a logged warning) and loads the rest as plain LoRA: the
    loaded pipeline computes what the same file without its dora_scale keys gives, not the trained model."""
    trained = _trained(family, "dora")
    tensors = export_kohya(family, unet=trained.unet, text_encoders=trained.text_encoders).tensors
    assert any(k.endswith(".dora_scale") for k in tensors)
    pipe = _loaded_pipe(tmp_path, family, _save(tmp_path, family, tensors))
    plain = {k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}
    reference = _loaded_pipe(tmp_path, family, _save(tmp_path, family, plain, "plain.safetensors"))
    assert not any(cfg.use_dora for cfg in pipe.unet.peft_config.values())
    out = _unet_out(pipe.unet, family)
    assert _rel(out, _unet_out(reference.unet, family)) < 1e-6
    assert _rel(out, _unet_out(trained.unet, family)) > 1e-2  # the DoRA magnitudes are lost


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_full", "dora"])
def test_baked_exports_load_in_diffusers_within_the_reported_svd_error(tmp_path, family, variant):
    """``bake="all"`` turns LoHa/LoKr/DoRA into plain LoRA that diffusers loads: at rank 2 every loaded
    module's change is the trained change up to exactly the reported relative SVD error; at full rank the
    pipeline's outputs equal the trained model's."""
    from comfyui_lora_trainer.training.formats.names import model_module_names
    from comfyui_lora_trainer.training.models import build_tiny_components

    trained = _trained(family, variant)
    models = [trained.unet, *trained.text_encoders]
    expected = _layer_changes(models)
    skeleton = build_tiny_components(family, seed=0)
    where = {name: ([skeleton.unet, *skeleton.text_encoders].index(m), path)
             for name, (m, path) in model_module_names(family, skeleton.unet, skeleton.text_encoders).items()}

    lossy = export_kohya(family, unet=trained.unet, text_encoders=trained.text_encoders, bake="all", bake_rank=2)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lossy.tensors)
    pipe = _loaded_pipe(tmp_path, family, _save(tmp_path, family, lossy.tensors))
    loaded = _layer_changes([pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else []))
    assert set(lossy.bake_errors) and {where[n] for n in lossy.bake_errors} == set(expected)
    for name, err in lossy.bake_errors.items():
        key = where[name]
        assert abs(_rel(loaded[key], expected[key]) - err) < 1e-4, (name, err)
    assert max(lossy.bake_errors.values()) > 1e-3  # rank 2 really is lossy

    exact = export_kohya(family, unet=trained.unet, text_encoders=trained.text_encoders, bake="all",
                         bake_rank=10_000)
    assert max(exact.bake_errors.values()) < 1e-5
    pipe = _loaded_pipe(tmp_path, family, _save(tmp_path, family, exact.tensors, "exact.safetensors"))
    assert _rel(_unet_out(pipe.unet, family), _unet_out(trained.unet, family)) < 1e-4
    for te_loaded, te_trained in zip([pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else []),
                                     trained.text_encoders):
        assert _rel(_te_out(te_loaded), _te_out(te_trained)) < 1e-4
