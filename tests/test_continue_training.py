"""Issue 3: continue training (``network_weights``) from a LoRA file in every key style the importer reads:
kohya (LoRA, LoCon, LoHa incl. Tucker, LoKr decomposed and full, DoRA), diffusers/peft (written by diffusers'
own ``save_lora_weights``), ComfyUI-native keys and a ComfyUI core Train LoRA node file (2-D conv factors,
alpha 1, ``diff_b``/``diff`` on biases and norms), for SD1.x and SDXL.

For each file: the adapter the run starts from changes every module's weight exactly as the file does
(compared per module path with the peft model that wrote it, or with the core file's factors), and a
1-step continued run (lr 1e-9) writes a file in our kohya format whose changes still equal the file's.
"""

import json
import os

import pytest
import torch

from comfyui_lora_trainer.training.adapters import AdapterError, add_adapter, attach_adapters
from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.continuation import Continuation
from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    RunInfo,
    export_kohya,
    load_lora_file,
    lora_delta,
    make_metadata,
    module_names,
    save_lora_file,
)
from comfyui_lora_trainer.training.formats.names import KOHYA_PREFIXES, model_module_names, te_module_path
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import build_tiny_components, unet_module_path_to_ldm

from peft_variants import TE, UNET_LINEAR, peft_configs

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")
TOL = 1e-5


def _configs():
    return peft_configs(lora_rslora=False)


def _source(family, variant, seed=1):
    """A tiny base (seed 0, as every run below) with a random, non-zero adapter of ``variant``."""
    base = build_tiny_components(family, seed=0)
    torch.manual_seed(seed)
    make = _configs()[variant]
    add_adapter(base.unet.requires_grad_(False), make(UNET_LINEAR))
    for te in base.text_encoders:
        add_adapter(te.requires_grad_(False), make(TE))
    if variant == "dora":  # a trained magnitude differs from ||W0 + dW||; otherwise DoRA == LoRA
        for m in base.unet.modules():
            mag = getattr(m, "lora_magnitude_vector", None)
            if mag is not None and "default" in mag:
                mag["default"].weight.data *= 1 + 0.3 * torch.rand_like(mag["default"].weight)
    return base


def _changes(models) -> dict:
    """(model index, module path) -> the weight change of each peft layer (DoRA: merged - base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for i, model in enumerate(models):
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            w0 = layer.get_base_layer().weight.detach().clone()
            if getattr(layer, "use_dora", {}).get("default", False):
                layer.merge(adapter_names=["default"])
                out[(i, path)] = layer.get_base_layer().weight.detach() - w0
                layer.unmerge()
            else:
                out[(i, path)] = layer.get_delta_weight("default").detach().reshape(w0.shape)
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------ files in each key style

def write_kohya(tmp_path, family, src):
    result = export_kohya(family, unet=src.unet, text_encoders=src.text_encoders)
    return save_lora_file(tmp_path / "kohya.safetensors",
                          LoraWeights(result.tensors, make_metadata(RunInfo(family=family)), family))


def write_diffusers(tmp_path, family, src):
    """diffusers' own writer: ``unet.…lora_A/B``, ``text_encoder[_2].…``, adapter metadata in the header."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    kw = {"unet_lora_layers": get_peft_model_state_dict(src.unet),
          "unet_lora_adapter_metadata": src.unet.peft_config["default"].to_dict()}
    for te, key in zip(src.text_encoders, ["text_encoder", "text_encoder_2"]):
        kw[f"{key}_lora_layers"] = get_peft_model_state_dict(te)
        kw[f"{key}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(str(tmp_path), weight_name="diffusers.safetensors", **kw)
    path = tmp_path / "diffusers.safetensors"
    assert any(k.startswith("unet.") and ".lora_A." in k for k in load_lora_file_raw(path))
    return str(path)


def load_lora_file_raw(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _native_key(family, model_index, path, src) -> str:
    if model_index == 0:
        return "diffusion_model." + unet_module_path_to_ldm(path, src.unet)
    clip = ("clip_l", "clip_g")[model_index - 1] if family == "sdxl" else "clip_l"
    return f"text_encoders.{clip}.transformer.{te_module_path(path)}"


def write_comfy_native(tmp_path, family, src):
    """ComfyUI's own key layout: ``diffusion_model.<LDM path>.<suffix>``, ``text_encoders.clip_l|clip_g…``
    (no metadata), renamed from our export with the names module's inverse map."""
    kohya = export_kohya(family, unet=src.unet, text_encoders=src.text_encoders).tensors
    names = model_module_names(family, src.unet, src.text_encoders)
    models = [src.unet, *src.text_encoders]
    native = {}
    for key, t in kohya.items():
        name, suffix = key.split(".", 1)
        model, path = names[name]
        native[_native_key(family, models.index(model), path, src) + "." + suffix] = t
    from safetensors.torch import save_file

    save_file(native, str(tmp_path / "native.safetensors"))
    return str(tmp_path / "native.safetensors")


def write_core_node(tmp_path, family, rank=2, seed=4):
    """A file as ComfyUI's core Train LoRA node writes it: every UNet Linear/Conv2d gets
    ``lora_up`` [out, r] and ``lora_down`` [r, in*k*k] (2-D, also for convolutions) and ``alpha`` 1.0; every
    bias a ``diff_b``, every 1-D weight (norms) a ``diff``. Returns (path, expected changes)."""
    base = build_tiny_components(family, seed=0)
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {"weights": {}, "biases": {}, "norms": {}}
    for path, m in base.unet.named_modules():
        w = getattr(m, "weight", None)
        if not path or w is None:
            continue
        try:
            key = "diffusion_model." + unet_module_path_to_ldm(path, base.unet)
        except ValueError:
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            up = torch.randn(w.shape[0], rank, generator=g) * 0.1
            down = torch.randn(rank, w[0].numel(), generator=g) * 0.1
            tensors.update({key + ".lora_up.weight": up, key + ".lora_down.weight": down,
                            key + ".alpha": torch.tensor(1.0)})
            expected["weights"][path] = (up @ down).reshape(w.shape) / rank
        elif w.dim() == 1:
            tensors[key + ".diff"] = d = torch.randn(w.shape, generator=g) * 0.01
            expected["norms"][path] = d
        if getattr(m, "bias", None) is not None:
            tensors[key + ".diff_b"] = b = torch.randn(m.bias.shape, generator=g) * 0.01
            expected["biases"][path] = b
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "core.safetensors"))
    return str(tmp_path / "core.safetensors"), expected


# ------------------------------------------------------------------ the run's starting adapter

def cfg(**over):
    values = dict(checkpoint="tiny", dataset=SAMPLE, output_dir="", steps=1, learning_rate=1e-9, resolution=64,
                  batch_size=1, seed=1, device="cpu", max_grad_norm=0.0)
    values.update(over)
    return TrainConfig(**values)


def start(path, family, **over):
    """What the loop does before its first step: a fresh base with the continued adapter attached."""
    base = build_tiny_components(family, seed=0)
    cont = Continuation(path)
    config = cont.resolve(cfg(network_weights=str(path), **over))
    cont.prepare(base, config)
    attach_adapters(base, config, adjust=cont.adjust)
    loaded = cont.load()
    return base, config, cont, loaded


def check_start(src, base, loaded):
    expected = _changes([src.unet, *src.text_encoders])
    got = _changes([base.unet, *base.text_encoders])
    assert loaded == len(expected)
    assert set(expected) <= set(got)
    for key, change in expected.items():
        assert _rel(got[key], change) < TOL, (key, _rel(got[key], change))


def check_continued_file(result, family, source_path):
    """The continued run's file is ours (kohya names, 0-dim float32 alphas, ss_* metadata) and still changes
    every module as the source file does (lr 1e-9 for one step)."""
    out = load_lora_file(result.path)
    assert out.source_format == "kohya" and out.family == family
    assert all(k.startswith(KOHYA_PREFIXES) for k in out.tensors)
    assert all(t.dim() == 0 and t.dtype == torch.float32 for k, t in out.tensors.items() if k.endswith(".alpha"))
    assert out.metadata["ss_network_module"] and out.metadata["sshs_model_hash"]
    fresh = build_tiny_components(family, seed=0)
    src = load_lora_file(source_path, family=family, unet_structure=fresh.unet)
    names = model_module_names(family, fresh.unet, fresh.text_encoders)
    assert set(module_names(out)) >= set(module_names(src))
    for name in module_names(src):
        model, path = names[name]
        w0 = model.get_submodule(path).weight.detach()
        keys = {k[len(name):] for k in src.tensors if k.startswith(name + ".")}
        if keys <= {".diff", ".diff_b"}:
            continue
        expected = lora_delta(src, name, base_weight=w0)
        assert _rel(lora_delta(out, name, base_weight=w0), expected) < TOL, name
    for k, t in src.tensors.items():  # diff / diff_b pass through unchanged
        if k.endswith((".diff", ".diff_b")):
            torch.testing.assert_close(out.tensors[k], t.float(), rtol=0, atol=0)


def continue_run(path, family, tmp_path, **over):
    events = []
    result = train(cfg(network_weights=str(path), output_dir=str(tmp_path / "out"), output_name="cont", **over),
                   base=build_tiny_components(family, seed=0), events=events.append)
    assert any("continuing from" in e.get("message", "") for e in events)
    return result


FAMILIES = ["sd1", "sdxl"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(_configs()))
def test_kohya_and_lycoris_files(tmp_path, family, variant):
    src = _source(family, variant)
    path = write_kohya(tmp_path, family, src)
    base, config, _, loaded = start(path, family)
    check_start(src, base, loaded)
    assert config.adapter == {"locon": "lora"}.get(variant, variant.split("_")[0])
    assert config.train_text_encoder  # the file has text-encoder modules
    result = continue_run(path, family, tmp_path)
    check_continued_file(result, family, path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("source_format,variant", [
    ("diffusers", "lora"), ("diffusers", "locon"), ("diffusers", "dora"),  # diffusers/peft keys
    ("comfyui", "locon"), ("comfyui", "loha"),  # ComfyUI-native keys
])
def test_diffusers_peft_and_comfyui_native_files(tmp_path, family, source_format, variant):
    src = _source(family, variant)
    write = {"diffusers": write_diffusers, "comfyui": write_comfy_native}[source_format]
    path = write(tmp_path, family, src)
    assert load_lora_file(path).source_format == source_format
    base, _, _, loaded = start(path, family)
    check_start(src, base, loaded)
    result = continue_run(path, family, tmp_path)
    check_continued_file(result, family, path)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_core_train_lora_node_files(tmp_path, family):
    path, expected = write_core_node(tmp_path, family)
    base, config, cont, loaded = start(path, family)
    assert config.rank == 2 and config.alpha == 1.0 and not config.train_text_encoder
    assert loaded == len(expected["weights"])
    fresh = build_tiny_components(family, seed=0)
    got = _changes([base.unet])
    for path_, change in expected["weights"].items():
        assert _rel(got[(0, path_)], change) < TOL, path_
    for what, table in (("bias", expected["biases"]), ("weight", expected["norms"])):
        for path_, d in table.items():  # diff_b / diff are in the base weights for the run
            layer = base.unet.get_submodule(path_)
            layer = getattr(layer, "base_layer", layer)
            before = getattr(fresh.unet.get_submodule(path_), what).detach()
            torch.testing.assert_close(getattr(layer, what).detach(), before + d)
    assert len(cont.passthrough) == len(expected["biases"]) + len(expected["norms"])
    result = continue_run(path, family, tmp_path)
    check_continued_file(result, family, path)


# ------------------------------------------------------------------ what the config may say

@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    return write_kohya(tmp, "sd1", _source("sd1", "locon")), _source("sd1", "locon")


def test_rank_alpha_and_adapter_come_from_the_file_when_left_at_defaults(lora_file):
    path, _ = lora_file
    _, config, _, _ = start(path, "sd1")  # cfg() leaves adapter/rank/alpha/conv_* at their defaults
    assert (config.adapter, config.rank, config.alpha, config.conv_rank, config.conv_alpha) == ("lora", 4, 2.0, 2, 1.0)


def test_a_set_rank_or_adapter_that_disagrees_names_the_file(lora_file):
    path, _ = lora_file
    with pytest.raises(ConfigError, match=r"network_weights = .*kohya\.safetensors.* rank 4.*rank = 8.*set rank = 4"):
        start(path, "sd1", rank=8)
    with pytest.raises(ConfigError, match=r"kohya\.safetensors.* adapter 'lora'.*adapter = 'loha'"):
        start(path, "sd1", adapter="loha")
    with pytest.raises(ConfigError, match=r"kohya\.safetensors.* conv_rank 2.*conv_rank = 3"):
        start(path, "sd1", conv_rank=3)
    start(path, "sd1", rank=4, adapter="lora")  # agreeing values are fine


def test_a_set_alpha_is_kept_and_the_file_scale_folded_into_its_weights(lora_file):
    path, src = lora_file
    base, config, _, loaded = start(path, "sd1", alpha=1.0)
    assert config.alpha == 1.0
    check_start(src, base, loaded)  # the same starting change with another alpha
    scalings = {float(m.scaling["default"]) for m in base.unet.modules() if hasattr(m, "lora_A")
                and "default" in getattr(m, "lora_A", {}) and m.r["default"] == 4}
    assert scalings == {0.25}


def test_the_preset_adds_fresh_modules_next_to_the_files(lora_file):
    path, src = lora_file
    base, _, _, loaded = start(path, "sd1", target="attention_ff")
    check_start(src, base, loaded)
    changes = _changes([base.unet])
    fresh = [k for k in changes if k[1].endswith("ff.net.0.proj")]  # in the preset, not in the file
    assert fresh and all(float(changes[k].abs().max()) == 0 for k in fresh)


def test_a_file_for_another_family_is_refused_naming_it(tmp_path):
    path = write_kohya(tmp_path, "sdxl", _source("sdxl", "lora"))
    with pytest.raises(AdapterError, match=r"kohya\.safetensors.* is a LoRA for sdxl, the model is sd1"):
        start(path, "sd1")


def test_a_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"network_weights = .*nope\.safetensors"):
        Continuation(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"network_weights = .*bad\.safetensors"):
        Continuation(tmp_path / "bad.safetensors")


def test_a_file_mixing_adapter_types_is_refused(tmp_path):
    a = export_kohya("sd1", unet=_source("sd1", "lora").unet).tensors
    b = export_kohya("sd1", text_encoders=_source("sd1", "loha").text_encoders).tensors
    path = save_lora_file(tmp_path / "mixed.safetensors", LoraWeights({**a, **b}, {}, "sd1"))
    with pytest.raises(AdapterError, match=r"mixed\.safetensors.* mixes adapter types"):
        Continuation(path)


def test_diffusers_adapter_metadata_gives_the_alphas(tmp_path):
    """Without the ``lora_adapter_metadata`` header diffusers (and our importer) assume alpha = rank: the
    header is what makes the start exact for a file whose alpha differs from its rank."""
    src = _source("sd1", "lora")
    path = write_diffusers(tmp_path, "sd1", src)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8
    _, config, _, _ = start(path, "sd1")
    assert (config.rank, config.alpha) == (4, 8.0)
