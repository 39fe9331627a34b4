"""training/models: name maps, tiny models, detection, loading/writing, conditioning (CPU, fast)."""
import json
import os

import pytest
import torch

from comfyui_lora_trainer.training.models import (
    BaseModel,
    Conditioning,
    UnsupportedModelError,
    build_components,
    build_tiny_components,
    detect_family,
    encode_images,
    encode_prompts,
    family_config,
    ldm_state_dict,
    load_base_model,
    tiny_tokenizer_dir,
    unet_module_path_to_ldm,
    write_checkpoint,
    write_tiny_checkpoint,
)
from comfyui_lora_trainer.training.formats import ldm_names
from comfyui_lora_trainer.training.models.loader import (
    infer_te_config,
    infer_unet_config,
    infer_vae_config,
    make_text_encoder,
    make_unet,
    make_vae,
)

FAMS = ["sd1", "sd2", "sd2-v", "sdxl"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: thread start-up/oversubscription costs more than it saves on small CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return {f: build_tiny_components(f, seed=3) for f in FAMS}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for f in FAMS:
        p = str(d / f"tiny_{f}.safetensors")
        write_checkpoint(tiny[f], p)
        out[f] = p
    return out


def _maps(base: BaseModel):
    fam = family_config(base.family)
    u = base.unet.state_dict()
    v = base.vae.state_dict()
    parts = [("unet", base.unet, u, ldm_names.unet_key_map(u.keys(), base.unet)),
             ("vae", base.vae, v, ldm_names.vae_key_map(v.keys(), base.vae))]
    for i, (te, e) in enumerate(zip(base.text_encoders, fam["text_encoders"])):
        t = te.state_dict()
        parts.append((f"te{i}", te, t, ldm_names.text_encoder_key_map(t.keys(), e["layout"], e["ldm_prefix"])))
    return parts


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", FAMS)
def test_diffusers_ldm_diffusers_round_trip_exact(tiny, family):
    base = tiny[family]
    ldm = ldm_state_dict(base)
    used = set()
    for name, _, sd, kmap in _maps(base):
        back, missing, u = ldm_names.from_ldm(ldm, kmap)
        used |= u
        assert not missing, (name, missing[:3])
        assert set(back) == set(sd)
        for k in sd:
            assert back[k].shape == sd[k].shape, k
            assert torch.equal(back[k], sd[k]), (name, k)
    assert used == set(ldm)  # every written tensor belongs to exactly one component
    # distinct values per tensor: a swapped mapping would be caught
    assert len({float(v.float().sum()) for v in ldm.values()}) > 0.9 * len(ldm)


@pytest.mark.parametrize("family", FAMS)
def test_ldm_names_agree_with_diffusers_converters(tiny, family):
    """Independent oracle: diffusers' own LDM->diffusers converters must invert our diffusers->LDM map."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint)
    base = tiny[family]
    ldm = ldm_state_dict(base)
    u = convert_ldm_unet_checkpoint(ldm, dict(base.unet.config))
    ref = base.unet.state_dict()
    assert set(u) == set(ref)
    assert all(torch.equal(u[k], ref[k]) for k in ref)
    v = convert_ldm_vae_checkpoint(ldm, dict(base.vae.config))
    ref = base.vae.state_dict()
    assert set(v) == set(ref)
    assert all(torch.equal(v[k].reshape(ref[k].shape), ref[k]) for k in ref)
    te1 = base.text_encoders[0]
    ref = te1.state_dict()
    if family in ("sd1", "sdxl"):
        prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
        c = convert_ldm_clip_checkpoint({k: v for k, v in ldm.items() if k.startswith(prefix)}, remove_prefix=prefix)
        c = {k[len("text_model."):]: v for k, v in c.items()}
        assert set(c) == set(ref) and all(torch.equal(c[k], ref[k]) for k in ref)
    if family == "sdxl":
        te2 = base.text_encoders[1]
        c = convert_open_clip_checkpoint(te2, ldm, prefix="conditioner.embedders.1.model.")
        ref = te2.state_dict()
        assert set(c) == set(ref) and all(torch.equal(c[k], ref[k]) for k in ref)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_size_architectures_map_and_infer(family):
    """Full-size SD1.5 / SD2 / SDXL (on meta, no memory): every key maps, diffusers' converter inverts the
    map, and the configs re-inferred from the LDM shapes equal the shipped real configs."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    fam = family_config(family)
    with init_empty_weights():
        unet = make_unet(fam["unet"])
        vae = make_vae(fam["vae"])
        tes = [make_text_encoder(e["class"], e["config"]) for e in fam["text_encoders"]]
    usd = unet.state_dict()
    ldm_u = ldm_names.to_ldm(usd, ldm_names.unet_key_map(usd, unet))
    back = convert_ldm_unet_checkpoint(ldm_u, dict(unet.config))
    assert set(back) == set(usd)
    vsd = vae.state_dict()
    ldm_v = ldm_names.to_ldm(vsd, ldm_names.vae_key_map(vsd, vae))
    assert set(convert_ldm_vae_checkpoint(ldm_v, dict(vae.config))) == set(vsd)
    n_unet = {"sd1": 686, "sd2": 686, "sdxl": 1680}[family]
    assert len(ldm_u) == n_unet
    shapes = {k: tuple(v.shape) for k, v in ldm_u.items()}
    te_cfgs = []
    for te, e in zip(tes, fam["text_encoders"]):
        t = te.state_dict()
        lt = ldm_names.to_ldm(t, ldm_names.text_encoder_key_map(t, e["layout"], e["ldm_prefix"]))
        sub = {k[len(e["ldm_prefix"]):]: tuple(v.shape) for k, v in lt.items()}
        cfg = infer_te_config(sub, e)
        for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size",
                  "max_position_embeddings", "hidden_act"):
            assert cfg[k] == e["config"][k], (k, cfg[k], e["config"][k])
        te_cfgs.append(cfg)
    got = infer_unet_config({k[len("model.diffusion_model."):]: s for k, s in shapes.items()}, fam,
                            te_cfgs[-1].get("projection_dim"))
    for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
              "attention_head_dim", "transformer_layers_per_block", "use_linear_projection",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        want = fam["unet"].get(k, {"use_linear_projection": False}.get(k))
        have = got.get(k)
        if k == "transformer_layers_per_block" and want is None:
            want = 1
        if isinstance(want, list) and isinstance(have, int):
            have = [have] * len(want)
        assert have == want, (k, have, want)
    full = dict(shapes)
    full.update({k: tuple(v.shape) for k, v in ldm_v.items()})
    for te, e in zip(tes, fam["text_encoders"]):
        t = te.state_dict()
        full.update({k: tuple(v.shape) for k, v in ldm_names.to_ldm(
            t, ldm_names.text_encoder_key_map(t, e["layout"], e["ldm_prefix"])).items()})
    assert detect_family(full) == family
    vgot = infer_vae_config({k[len("first_stage_model."):]: tuple(v.shape) for k, v in ldm_v.items()}, fam)
    for k in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert vgot[k] == fam["vae"][k]


# ------------------------------------------------------------------ module paths (docs/lora-format.md section 3)
SDXL_TABLE = [
    ("down_blocks.1.attentions.0", "input_blocks.4.1"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("mid_block.attentions.0.transformer_blocks.9.attn2.to_k", "middle_block.1.transformer_blocks.9.attn2.to_k"),
    ("mid_block.resnets.0.norm1", "middle_block.0.in_layers.0"),
    ("mid_block.resnets.1.norm2", "middle_block.2.out_layers.0"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "output_blocks.0.1.transformer_blocks.0.ff.net.0.proj"),
    ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_out", "out.2"),
]


@pytest.mark.parametrize("path,want", SDXL_TABLE)
def test_unet_module_path_to_ldm_sdxl_table(path, want):
    cfg = family_config("sdxl")["unet"]
    assert unet_module_path_to_ldm(path, cfg) == want


def test_unet_module_path_to_ldm_other_layouts(tiny):
    sd1 = family_config("sd1")["unet"]
    assert unet_module_path_to_ldm("up_blocks.0.upsamplers.0.conv", sd1) == "output_blocks.2.1.conv"  # no attention
    assert unet_module_path_to_ldm("up_blocks.1.upsamplers.0.conv", sd1) == "output_blocks.5.2.conv"
    assert unet_module_path_to_ldm("down_blocks.3.resnets.1", sd1) == "input_blocks.11.0"
    # layers_per_block=1 (tiny SDXL): every LDM key the model writes is reachable from its module paths
    unet = tiny["sdxl"].unet
    assert unet_module_path_to_ldm("down_blocks.1.attentions.0", unet) == "input_blocks.3.1"
    assert unet_module_path_to_ldm("base_model.model.up_blocks.0.upsamplers.0.conv", unet) == "output_blocks.1.2.conv"
    ldm_keys = set(ldm_state_dict(tiny["sdxl"]))
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            assert "model.diffusion_model." + unet_module_path_to_ldm(name, unet) + ".weight" in ldm_keys, name
    with pytest.raises(ValueError):
        unet_module_path_to_ldm("down_blocks.1", unet)


# ------------------------------------------------------------------ write / load
@pytest.mark.parametrize("family", FAMS)
def test_tiny_checkpoint_loads_with_identical_outputs(tiny, tiny_files, family):
    base = tiny[family]
    loaded = load_base_model(tiny_files[family])
    assert loaded.family == family and loaded.is_tiny and loaded.default_resolution == 64
    assert loaded.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    for a, b in zip([base.unet, base.vae] + base.text_encoders, [loaded.unet, loaded.vae] + loaded.text_encoders):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(p.device.type == "cpu" for p in b.parameters())
        assert type(a) is type(b)
    caps = ["a photo of the cat", "painting with dog, style"]
    with torch.no_grad():
        c1, c2 = encode_prompts(base, caps), encode_prompts(loaded, caps)
        assert torch.equal(c1.encoder_hidden_states, c2.encoder_hidden_states)
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        l1 = encode_images(base, x, sample=False)
        l2 = encode_images(loaded, x, sample=False)
        assert torch.equal(l1, l2)
        t = torch.tensor([3, 700])
        o1 = base.unet(l1, t, c1.encoder_hidden_states, added_cond_kwargs=c1.added_cond_kwargs).sample
        o2 = loaded.unet(l2, t, c2.encoder_hidden_states, added_cond_kwargs=c2.added_cond_kwargs).sample
    assert torch.equal(o1, o2)


def test_loader_uses_shipped_constants_not_hints(tiny_files):
    """The arch hint only carries family/resolution/tiny; sizes come from shapes."""
    from safetensors import safe_open
    with safe_open(tiny_files["sdxl"], "pt") as f:
        meta = f.metadata()
    hint = json.loads(meta["comfyui_lora_trainer.arch"])
    assert set(hint) == {"family", "default_resolution", "tiny"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    loaded = load_base_model(tiny_files["sdxl"])
    assert loaded.unet.config.norm_num_groups == 32
    assert loaded.text_encoders[0].config.hidden_size != loaded.text_encoders[1].config.hidden_size
    assert loaded.text_encoders[0].config.hidden_act == "quick_gelu"
    assert loaded.text_encoders[1].config.hidden_act == "gelu"
    assert loaded.unet.config.addition_time_embed_dim == 8


def test_load_family_override_and_dtype(tiny_files):
    b = load_base_model(tiny_files["sd2"], family="sd2-v", dtype=torch.bfloat16)
    assert b.family == "sd2-v" and b.prediction_type == "v_prediction"
    assert all(p.dtype == torch.bfloat16 for p in b.unet.parameters())
    with pytest.raises(ValueError, match="looks like"):
        load_base_model(tiny_files["sd2"], family="sdxl")


def test_load_errors_name_the_file(tmp_path, tiny_files):
    # truncated
    data = open(tiny_files["sd1"], "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors.*truncated"):
        load_base_model(str(bad))
    # garbage
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_base_model(str(junk))
    # missing tensor
    from safetensors.torch import load_file, save_file
    sd = load_file(tiny_files["sd1"])
    sd.pop("first_stage_model.decoder.up.0.block.0.conv1.weight")
    miss = tmp_path / "missing.safetensors"
    save_file(sd, str(miss), metadata={"comfyui_lora_trainer.arch": json.dumps({"family": "sd1", "tiny": True})})
    with pytest.raises(ValueError, match="missing.safetensors.*VAE.*decoder.up.0.block.0.conv1.weight"):
        load_base_model(str(miss))
    # unexpected tensor inside a component
    sd = load_file(tiny_files["sd1"])
    sd["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(2)
    unx = tmp_path / "unexpected.safetensors"
    save_file(sd, str(unx), metadata={"comfyui_lora_trainer.arch": json.dumps({"family": "sd1", "tiny": True})})
    with pytest.raises(ValueError, match="unexpected.safetensors.*unexpected.*extra.weight"):
        load_base_model(str(unx))
    # pickle that needs code execution is refused; a plain tensor pickle loads
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    pk = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil()}, str(pk))
    with pytest.raises(ValueError, match="evil.ckpt.*weights_only"):
        load_base_model(str(pk))
    ok = tmp_path / "plain.ckpt"
    torch.save({"state_dict": load_file(tiny_files["sd1"])}, str(ok))
    b = load_base_model(str(ok), tokenizer_dir=tiny_tokenizer_dir())
    assert b.family == "sd1"
    # non-tiny checkpoint without tokenizer -> clear error
    with pytest.raises(ValueError, match="plain.ckpt.*tokenizer_dir"):
        load_base_model(str(ok))
    with pytest.raises(FileNotFoundError):
        load_base_model(str(tmp_path / "nope.safetensors"))


def test_diffusers_folder(tmp_path, tiny):
    b = tiny["sdxl"]
    root = tmp_path / "xl"
    for name, m in [("unet", b.unet), ("vae", b.vae), ("text_encoder", b.text_encoders[0]),
                    ("text_encoder_2", b.text_encoders[1])]:
        m.save_pretrained(str(root / name))
    b.tokenizers[0].save_pretrained(str(root / "tokenizer"))
    b.tokenizers[1].save_pretrained(str(root / "tokenizer_2"))
    b.noise_scheduler.save_config(str(root / "scheduler"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    loaded = load_base_model(str(tmp_path / "xl"))
    assert loaded.family == "sdxl"
    sa, sb = b.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(encode_prompts(b, ["a cat"]).encoder_hidden_states,
                           encode_prompts(loaded, ["a cat"]).encoder_hidden_states)
    assert loaded.tokenizers[1].pad_token_id == 0 and loaded.tokenizers[0].pad_token_id == loaded.tokenizers[0].eos_token_id


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize("family", FAMS)
def test_detect_family_on_tiny(tiny, tiny_files, family):
    from comfyui_lora_trainer.training.models import read_shapes
    shapes, meta = read_shapes(tiny_files[family])
    assert detect_family(shapes, meta) == family
    want = "sd2" if family == "sd2-v" else family  # weights alone cannot tell v-prediction
    assert detect_family(ldm_state_dict(tiny[family])) == want
    assert detect_family(list(shapes.items())) == want


def test_detect_sd2_v_by_comfyui_heuristic_and_metadata(tiny):
    sd = dict(ldm_state_dict(tiny["sd2"]))
    k = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    sd[k] = torch.zeros(64)
    assert detect_family(sd) == "sd2"
    sd[k] = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert detect_family(sd) == "sd2-v"
    sd[k] = torch.zeros(64)
    assert detect_family(sd, {"modelspec.prediction_type": "v"}) == "sd2-v"
    assert detect_family(sd, {"modelspec.architecture": "stable-diffusion-v2-768-v"}) == "sd2-v"


def _shapes(base):
    return {k: tuple(v.shape) for k, v in ldm_state_dict(base).items()}


@pytest.mark.parametrize("case,pattern", [
    ("inpaint", "inpainting"),
    ("sd3", "SD3"),
    ("flux", "Flux"),
    ("flux_bare", "Flux"),
    ("refiner", "refiner"),
    ("lora", "LoRA"),
    ("unet_only", "UNet-only"),
    ("no_te", "without a text encoder"),
    ("sdxl_vpred", "v-prediction"),
    ("unclip", "unCLIP"),
    ("random", "unrecognised"),
])
def test_detect_unsupported(tiny, case, pattern):
    sd1 = _shapes(tiny["sd1"])
    xl = _shapes(tiny["sdxl"])
    if case == "inpaint":
        s = dict(sd1)
        s["model.diffusion_model.input_blocks.0.0.weight"] = (32, 9, 3, 3)
    elif case == "sd3":
        s = {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4, 4), **{k: v for k, v in sd1.items() if "first_stage" in k}}
    elif case == "flux":
        s = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9, 3), "model.diffusion_model.img_in.weight": (3, 64)}
    elif case == "flux_bare":
        s = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (4, 4)}
    elif case == "refiner":
        s = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in xl.items()
             if not k.startswith("conditioner.embedders.0.")}
    elif case == "lora":
        s = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}
    elif case == "unet_only":
        s = {k[len("model.diffusion_model."):]: v for k, v in sd1.items() if k.startswith("model.diffusion_model.")}
    elif case == "no_te":
        s = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    elif case == "sdxl_vpred":
        s = dict(xl, v_pred=())
    elif case == "unclip":
        s = dict(sd1)
        s["model.diffusion_model.label_emb.0.0.weight"] = (128, 1536)
        s = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.model."): v for k, v in s.items()}
    else:
        s = {"foo.bar": (1,)}
    with pytest.raises(UnsupportedModelError, match=pattern) as ei:
        detect_family(s)
    assert "not supported" in str(ei.value)


def test_unsupported_file_error_names_file(tmp_path, tiny_files):
    from safetensors.torch import load_file, save_file
    sd = load_file(tiny_files["sd1"])
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], 1)
    p = tmp_path / "inpaint.safetensors"
    save_file(sd, str(p))
    with pytest.raises(UnsupportedModelError, match="inpaint.safetensors.*inpainting.*not supported yet"):
        load_base_model(str(p))


# ------------------------------------------------------------------ tokenizers and conditioning
def test_tokenizer_padding_per_family(tiny):
    sd1, sd2, xl = tiny["sd1"], tiny["sd2"], tiny["sdxl"]
    ids1 = sd1.tokenizers[0](["a cat"], padding="max_length", max_length=77).input_ids[0]
    ids2 = sd2.tokenizers[0](["a cat"], padding="max_length", max_length=77).input_ids[0]
    eos = sd1.tokenizers[0].eos_token_id
    assert len(ids1) == 77 and ids1[-1] == eos and ids1.count(eos) > 70
    assert ids2[-1] == 0 and ids2.count(eos) == 1
    assert xl.tokenizers[0].pad_token_id == eos and xl.tokenizers[1].pad_token_id == 0
    assert all(t.model_max_length == 77 for b in tiny.values() for t in b.tokenizers)
    assert sd1.tokenizers[0].convert_ids_to_tokens(0) == "!"
    assert os.path.isfile(os.path.join(tiny_tokenizer_dir(), "vocab.json"))
    assert len(sd1.tokenizers[0]) == sd1.text_encoders[0].config.vocab_size


def test_encode_prompts_semantics(tiny):
    caps = ["a photo of the cat", "dog"]
    with torch.no_grad():
        # sd1: last hidden state
        b = tiny["sd1"]
        c = encode_prompts(b, caps)
        ids = b.tokenizers[0](caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(c.encoder_hidden_states, b.text_encoders[0](ids).last_hidden_state)
        assert isinstance(c, Conditioning) and len(c) == 2
        assert c.added_cond_kwargs is None and c.encoder_hidden_states.shape == (2, 77, 64)
        # sd2: penultimate + final LN (differs from last hidden state)
        b = tiny["sd2"]
        c = encode_prompts(b, caps)
        te = b.text_encoders[0]
        ids = b.tokenizers[0](caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        o = te(ids, output_hidden_states=True)
        assert torch.equal(c.encoder_hidden_states, te.final_layer_norm(o.hidden_states[-2]))
        assert not torch.allclose(c.encoder_hidden_states, o.last_hidden_state)
        # sdxl
        b = tiny["sdxl"]
        c = encode_prompts(b, caps, sizes=[(512, 384, 16, 0, 64, 64), (64, 64, 0, 0, 64, 64)])
        assert c.encoder_hidden_states.shape == (2, 77, 64 + 128)
        assert c.added_cond_kwargs["text_embeds"].shape == (2, 128)
        assert c.added_cond_kwargs["time_ids"].tolist()[0] == [512, 384, 16, 0, 64, 64]
        ids2 = b.tokenizers[1](caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        o2 = b.text_encoders[1](ids2, output_hidden_states=True)
        assert torch.equal(c.encoder_hidden_states[..., 64:], o2.hidden_states[-2])
        assert torch.equal(c.added_cond_kwargs["text_embeds"], o2.text_embeds)
        d = encode_prompts(b, caps)
        assert d.added_cond_kwargs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    # grad flows into the text encoder
    b = tiny["sd1"]
    c = encode_prompts(b, ["a cat"])
    c.encoder_hidden_states.sum().backward()
    g = b.text_encoders[0].encoder.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    b.text_encoders[0].zero_grad(set_to_none=True)


def test_encode_images(tiny):
    b = tiny["sd1"]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        m = encode_images(b, x, sample=False)
        ref = b.vae.encode(x).latent_dist.mean * b.vae.config.scaling_factor
        s1 = encode_images(b, x, generator=torch.Generator().manual_seed(1))
    assert m.shape == (1, 4, 8, 8) and torch.equal(m, ref)
    assert not torch.equal(s1, m)
    assert b.vae.config.scaling_factor == 0.18215 and tiny["sdxl"].vae.config.scaling_factor == 0.13025
    with pytest.raises(ValueError):
        encode_images(b, torch.zeros(1, 3, 60, 64))


def test_tiny_build_is_fast_small_and_seeded():
    import time
    t = time.perf_counter()
    b = build_tiny_components("sdxl", seed=1)
    assert time.perf_counter() - t < 1.0
    assert sum(p.numel() for p in b.unet.parameters()) < 2_000_000
    b2 = build_tiny_components("sdxl", seed=1)
    b3 = build_tiny_components("sdxl", seed=2)
    k = "conv_in.weight"
    assert torch.equal(b.unet.state_dict()[k], b2.unet.state_dict()[k])
    assert not torch.equal(b.unet.state_dict()[k], b3.unet.state_dict()[k])
    s = torch.get_rng_state()
    build_tiny_components("sd1", seed=5)
    assert torch.equal(s, torch.get_rng_state())  # global RNG untouched


def test_write_tiny_checkpoint(tmp_path):
    p = write_tiny_checkpoint(tmp_path / "t.safetensors", "sd2-v", seed=0)
    assert p == str(tmp_path / "t.safetensors")
    b = load_base_model(p)
    assert b.family == "sd2-v" and b.default_resolution == 64
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


# ------------------------------------------------------------------ ComfyUI-detectable SD1.5-shaped checkpoint
def _comfy_detect_unet_config(sd, prefix="model.diffusion_model."):
    """Re-statement of ComfyUI comfy/model_detection.py::detect_unet_config for LDM UNets (shapes only)."""
    keys = list(sd)

    def count_blocks(fmt):
        c = 0
        while any(k.startswith(fmt.format(c)) for k in keys):
            c += 1
        return c

    def tdepth(p):
        tp = p + "1.transformer_blocks."
        if any(k.startswith(tp) for k in keys):
            return (count_blocks(tp + "{}"), sd[tp + "0.attn2.to_k.weight"][1], len(sd[p + "1.proj_in.weight"]) == 2)
        return None

    cfg = {"adm_in_channels": sd[prefix + "label_emb.0.0.weight"][1] if prefix + "label_emb.0.0.weight" in sd else None}
    mc = sd[prefix + "input_blocks.0.0.weight"][0]
    num_res, mult, td, tdo = [], [], [], []
    ctx = lin = None
    last_res = last_mult = 0
    n = count_blocks(prefix + "input_blocks.{}.")
    for c in range(n):
        p = f"{prefix}input_blocks.{c}."
        po = f"{prefix}output_blocks.{n - c - 1}."
        if p + "0.op.weight" in sd:
            num_res.append(last_res)
            mult.append(last_mult)
            last_res = last_mult = 0
            o = tdepth(po)
            tdo.append(o[0] if o else 0)
        else:
            if p + "0.in_layers.0.weight" in sd:
                last_res += 1
                last_mult = sd[p + "0.out_layers.3.weight"][0] // mc
                o = tdepth(p)
                td.append(o[0] if o else 0)
                if o and ctx is None:
                    ctx, lin = o[1], o[2]
            if po + "0.in_layers.0.weight" in sd:
                o = tdepth(po)
                tdo.append(o[0] if o else 0)
    num_res.append(last_res)
    mult.append(last_mult)
    cfg.update(model_channels=mc, in_channels=sd[prefix + "input_blocks.0.0.weight"][1], num_res_blocks=num_res,
               channel_mult=mult, transformer_depth=td, transformer_depth_output=tdo, context_dim=ctx,
               use_linear_in_transformer=lin,
               transformer_depth_middle=count_blocks(prefix + "middle_block.1.transformer_blocks.{}"))
    return cfg


def test_sd15_shaped_checkpoint_has_comfyui_keys():
    from accelerate import init_empty_weights
    with init_empty_weights():
        b = build_components("sd1")
    sd = {k: tuple(v.shape) for k, v in ldm_state_dict(b).items()}
    # ComfyUI picks the UNet prefix by counting keys, then matches SD15 on these fields (supported_models.SD15)
    assert sum(k.startswith("model.diffusion_model.") for k in sd) > 5
    cfg = _comfy_detect_unet_config(sd)
    assert cfg["model_channels"] == 320 and cfg["context_dim"] == 768
    assert cfg["use_linear_in_transformer"] is False and cfg["adm_in_channels"] is None
    assert cfg["in_channels"] == 4 and cfg["num_res_blocks"] == [1, 1] and cfg["channel_mult"] == [1, 2]
    assert cfg["transformer_depth"] == [1, 0] and cfg["transformer_depth_output"] == [1, 1, 0, 0]  # ComfyUI order
    assert cfg["transformer_depth_middle"] == 1
    assert sd["model.diffusion_model.out.2.weight"][0] == 4
    # SD15 unet_extra_config num_heads=8: head dims 40 / 80 as in our attention_head_dim=8
    assert b.unet.config.attention_head_dim == 8
    # CLIP-L under cond_stage_model.transformer.text_model.* with ComfyUI's clip_l shapes (12 layers, 768, 49408, 77)
    te = "cond_stage_model.transformer.text_model."
    assert sd[te + "embeddings.token_embedding.weight"] == (49408, 768)
    assert sd[te + "embeddings.position_embedding.weight"] == (77, 768)
    assert sd[te + "final_layer_norm.weight"] == (768,)
    for i in range(12):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                  "mlp.fc2", "layer_norm1", "layer_norm2"):
            assert te + f"encoder.layers.{i}.{n}.weight" in sd
    assert not any(k.startswith(te + "encoder.layers.12.") for k in sd)
    # full-size SD VAE in LDM names (ComfyUI builds ch=128, ch_mult [1,2,4,4] and loads these names)
    v = "first_stage_model."
    for k, s in [("encoder.conv_in.weight", (128, 3, 3, 3)), ("encoder.down.3.block.1.conv2.weight", (512, 512, 3, 3)),
                 ("encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
                 ("encoder.down.0.downsample.conv.weight", (128, 128, 3, 3)),
                 ("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)), ("encoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
                 ("encoder.mid.attn_1.norm.weight", (512,)), ("encoder.mid.block_2.conv1.weight", (512, 512, 3, 3)),
                 ("encoder.norm_out.weight", (512,)), ("encoder.conv_out.weight", (8, 512, 3, 3)),
                 ("quant_conv.weight", (8, 8, 1, 1)), ("post_quant_conv.weight", (4, 4, 1, 1)),
                 ("decoder.conv_in.weight", (512, 4, 3, 3)), ("decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
                 ("decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
                 ("decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)), ("decoder.conv_out.weight", (3, 128, 3, 3))]:
        assert sd[v + k] == s, k
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd
    # every key has one of the LDM prefixes ComfyUI/A1111 expect
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."))
               for k in sd)


@pytest.mark.skipif(not os.path.isdir("/work/.mirror/Comfy-Org+ComfyUI/repo"), reason="ComfyUI source mirror absent")
def test_comfyui_clip_config_matches_sd15_text_encoder():
    import subprocess
    out = subprocess.run(["git", "--git-dir=/work/.mirror/Comfy-Org+ComfyUI/repo", "show",
                          "HEAD:comfy/sd1_clip_config.json"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip("file not in mirror")
    cfg = json.loads(out.stdout)
    te = family_config("sd1")["text_encoders"][0]["config"]
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings", "hidden_act"):
        assert cfg[k] == te[k], k


def test_tokenizer_beside_checkpoint(tmp_path, tiny):
    from safetensors.torch import load_file, save_file
    import shutil
    p = tmp_path / "model.safetensors"
    write_checkpoint(tiny["sd1"], str(p))
    save_file(load_file(str(p)), str(p))  # drop the metadata: no longer recognisably tiny
    with pytest.raises(ValueError, match="tokenizer"):
        load_base_model(str(p))
    shutil.copytree(tiny_tokenizer_dir(), tmp_path / "tokenizer")
    b = load_base_model(str(p))
    assert b.family == "sd1" and not b.is_tiny and b.default_resolution == 512
    assert b.tokenizers[0].model_max_length == 77


@pytest.mark.skipif(not os.path.isdir("/work/.mirror/Comfy-Org+ComfyUI/repo"), reason="ComfyUI source mirror absent")
def test_comfyui_bundled_tokenizer_padding(tmp_path):
    import subprocess
    from comfyui_lora_trainer.training.models.loader import load_tokenizers
    d = tmp_path / "sd1_tokenizer"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        out = subprocess.run(["git", "--git-dir=/work/.mirror/Comfy-Org+ComfyUI/repo", "show",
                              f"HEAD:comfy/sd1_tokenizer/{name}"], capture_output=True)
        if out.returncode:
            pytest.skip(f"{name} not in mirror")
        (d / name).write_bytes(out.stdout)
    t1, t2 = load_tokenizers(str(d), family_config("sdxl"))
    assert t1.model_max_length == 77 and t2.model_max_length == 77
    ids1 = t1(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    ids2 = t2(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids1[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids1[7:] == [49407] * 70            # CLIP-L pads with <|endoftext|>
    assert ids2[:7] == ids1[:7] and ids2[7:] == [0] * 70   # OpenCLIP pads with 0 ("!")
