"""The one place that builds kohya LoRA module names, and maps them to checkpoint keys.

kohya name = ``prefix + "_" + module_path.replace(".", "_")`` (docs/lora-format.md §1-3):

* UNet: ``lora_unet_<diffusers path>`` for SD1/SD2, ``lora_unet_<LDM/SAI path>`` for SDXL;
* text encoders: ``lora_te_text_model_...`` (SD1/SD2), ``lora_te1_text_model_...`` /
  ``lora_te2_text_model_...`` (SDXL); the ``text_model`` level is always present;
* the diffusion model ComfyUI holds (any family, :func:`comfy_unet_name`): ``lora_unet_<ComfyUI module path>``,
  the names kohya's Flux/SD3/Lumina scripts write on purpose (``networks/lora_flux.py``: ``LORA_PREFIX_FLUX =
  "lora_unet"  # make ComfyUI compatible``) and ComfyUI's ``model_lora_keys_unet`` maps for every model.

``checkpoint_targets`` goes the other way for a single-file checkpoint: every LoRA module name a
loader would accept for it -> the checkpoint tensor it patches (with the q/k/v slice of OpenCLIP's
fused ``in_proj_weight`` where needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .ldm_names import UNET_PREFIX, _unet_structure, unet_path_to_ldm
from .families import ALL_FAMILIES, check_family

# tensor-name suffixes of one module
DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
MID = ".lora_mid.weight"
ALPHA = ".alpha"
DORA = ".dora_scale"
DIFF = ".diff"
DIFF_B = ".diff_b"
HADA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
ALL_SUFFIXES = (DOWN, UP, MID, ALPHA, DORA, DIFF, DIFF_B) + HADA + LOKR

# module-name prefixes: the UNet, the one SD1/SD2 text encoder, SDXL's two text encoders
UNET_PREFIX_KOHYA = "lora_unet"
TE_PREFIX_KOHYA = "lora_te"
TE1_PREFIX_KOHYA, TE2_PREFIX_KOHYA = "lora_te1", "lora_te2"
KOHYA_PREFIXES = tuple(p + "_" for p in (UNET_PREFIX_KOHYA, TE_PREFIX_KOHYA, TE1_PREFIX_KOHYA, TE2_PREFIX_KOHYA))
TE_KOHYA_PREFIXES = KOHYA_PREFIXES[1:]  # "lora_te_", "lora_te1_", "lora_te2_"
SDXL_TE_KOHYA_PREFIXES = KOHYA_PREFIXES[2:]  # "lora_te1_", "lora_te2_"

# UNet structure of the full-size public models: (layers_per_block, up blocks with attention)
DEFAULT_UNET_STRUCTURE = {
    "sd1": (2, [False, True, True, True]),
    "sd2": (2, [False, True, True, True]),
    "sd2-v": (2, [False, True, True, True]),
    "sdxl": (2, [True, True, False]),
}

# checkpoint text-encoder prefixes and layouts per family (kohya prefix, LDM prefix, layout)
TEXT_ENCODERS = {
    "sd1": [(TE_PREFIX_KOHYA, "cond_stage_model.transformer.", "hf_clip")],
    "sd2": [(TE_PREFIX_KOHYA, "cond_stage_model.model.", "open_clip")],
    "sd2-v": [(TE_PREFIX_KOHYA, "cond_stage_model.model.", "open_clip")],
    "sdxl": [(TE1_PREFIX_KOHYA, "conditioner.embedders.0.transformer.", "hf_clip"),
             (TE2_PREFIX_KOHYA, "conditioner.embedders.1.model.", "open_clip")],
}


def lora_name(prefix: str, module_path: str) -> str:
    return prefix + "_" + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """``"<lora_name>.lora_down.weight"`` -> (lora_name, ".lora_down.weight")."""
    name, dot, rest = key.partition(".")
    return name, dot + rest


def te_prefixes(family: str) -> list[str]:
    return [p for p, _, _ in TEXT_ENCODERS[check_family(family)]]


def te_module_path(path: str) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no ``text_model.``); ComfyUI/A1111 need it."""
    return path if path.startswith("text_model.") else "text_model." + path


def te_name(prefix: str, module_path: str) -> str:
    return lora_name(prefix, te_module_path(module_path))


def unet_name(family: str, diffusers_path: str, structure=None) -> str:
    """kohya name of a diffusers UNet module path; SDXL uses the LDM path (``structure``:
    a UNet, its config, or (layers_per_block, up_has_attention))."""
    if check_family(family) != "sdxl":
        return lora_name(UNET_PREFIX_KOHYA, diffusers_path)
    L, up_attn = _structure(family, structure)
    return lora_name(UNET_PREFIX_KOHYA, unet_path_to_ldm(diffusers_path, L, up_attn))


def comfy_unet_name(family: str, module_path: str, structure=None) -> str:
    """kohya name of the module ``module_path`` of ComfyUI's ``model.diffusion_model`` (dots, no ``diffusion_model.``
    prefix): ``lora_unet_<path, dots as underscores>``. SD1/SD2 get the diffusers path kohya writes for them where
    the LDM path has one (``structure`` as in :func:`unet_name`); SDXL and the DiT families keep ComfyUI's path."""
    family = check_family(family, ALL_FAMILIES)
    if family in ("sd1", "sd2", "sd2-v"):
        L, up_attn = _structure(family, structure)
        diffusers = ldm_unet_path_to_diffusers(module_path, L, up_attn)
        return lora_name(UNET_PREFIX_KOHYA, diffusers if diffusers is not None else module_path)
    return lora_name(UNET_PREFIX_KOHYA, module_path)


def _structure(family: str, structure) -> tuple[int, list[bool]]:
    if structure is None:
        return DEFAULT_UNET_STRUCTURE[family]
    if isinstance(structure, tuple):
        return structure
    return _unet_structure(structure)


def model_module_names(family: str, unet=None, text_encoders=()) -> dict[str, tuple[object, str]]:
    """kohya name -> (model, module path) for every module with a weight in a diffusers UNet and CLIP text
    encoders (Linear, Conv2d, norms...): the names :func:`unet_name` / :func:`te_name` give them, and for
    SD1/SD2 UNets also the LDM-path name ComfyUI and A1111 accept. Used to find the modules of a model
    that a LoRA file's modules patch."""
    family = check_family(family)
    out: dict[str, tuple[object, str]] = {}
    models = []
    if unet is not None:
        L, up_attn = _structure(family, unet)

        def unet_names(path, L=L, up_attn=up_attn):
            try:
                ldm = lora_name(UNET_PREFIX_KOHYA, unet_path_to_ldm(path, L, up_attn))
            except (ValueError, IndexError):
                ldm = None
            if family == "sdxl":
                return [ldm] if ldm else []
            return [lora_name(UNET_PREFIX_KOHYA, path)] + ([ldm] if ldm else [])

        models.append((unet, unet_names))
    for te, prefix in zip([t for t in text_encoders if t is not None], te_prefixes(family)):
        models.append((te, lambda path, prefix=prefix: [te_name(prefix, path)]))
    for model, names_of in models:
        for path, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not path or not hasattr(weight, "shape"):
                continue
            for n in names_of(path):
                out.setdefault(n, (model, path))
    return out


# ---------------------------------------------------------------------------------- LDM -> diffusers
_RESNET_DIFFUSERS = {
    ("in_layers", "0"): "norm1", ("in_layers", "2"): "conv1", ("emb_layers", "1"): "time_emb_proj",
    ("out_layers", "0"): "norm2", ("out_layers", "3"): "conv2", ("skip_connection",): "conv_shortcut",
}


def _resnet_tail(tail: list[str]) -> list[str]:
    for pat, name in _RESNET_DIFFUSERS.items():
        if tuple(tail[: len(pat)]) == pat:
            return [name] + tail[len(pat):]
    return tail


def ldm_unet_path_to_diffusers(path: str, layers_per_block: int, up_has_attention: list[bool]) -> str | None:
    """Inverse of ``ldm_names.unet_path_to_ldm``; None when ``path`` has no diffusers name."""
    p = path.split(".")
    L = layers_per_block
    try:
        if p[:2] == ["input_blocks", "0"] and p[2] == "0":
            out = ["conv_in"] + p[3:]
        elif p[:2] == ["out", "2"]:
            out = ["conv_out"] + p[2:]
        elif p[0] in ("time_embed", "label_emb"):
            rest = p[1:] if p[0] == "time_embed" else p[2:]
            head = "time_embedding" if p[0] == "time_embed" else "add_embedding"
            out = [head, {"0": "linear_1", "2": "linear_2"}[rest[0]]] + rest[1:]
        elif p[0] == "input_blocks":
            n, sub, tail = int(p[1]), p[2], p[3:]
            i, j = divmod(n - 1, L + 1)
            if j == L:  # downsampler at index (i+1)(L+1)
                if sub != "0" or tail[:1] != ["op"]:
                    return None
                out = ["down_blocks", str(i), "downsamplers", "0", "conv"] + tail[1:]
            elif sub == "0":
                out = ["down_blocks", str(i), "resnets", str(j)] + _resnet_tail(tail)
            else:
                out = ["down_blocks", str(i), "attentions", str(j)] + tail
        elif p[0] == "middle_block":
            k, tail = int(p[1]), p[2:]
            out = (["mid_block", "attentions", "0"] + tail) if k == 1 else (
                ["mid_block", "resnets", str(k // 2)] + _resnet_tail(tail))
        elif p[0] == "output_blocks":
            n, sub, tail = int(p[1]), p[2], p[3:]
            i, j = divmod(n, L + 1)
            if sub == "0":
                out = ["up_blocks", str(i), "resnets", str(j)] + _resnet_tail(tail)
            elif sub == "1" and up_has_attention[i]:
                out = ["up_blocks", str(i), "attentions", str(j)] + tail
            else:
                out = ["up_blocks", str(i), "upsamplers", "0"] + tail
        else:
            return None
        result = ".".join(out)
        return result if unet_path_to_ldm(result, L, up_has_attention) == path else None
    except (ValueError, IndexError, KeyError):
        return None


def unet_structure_from_keys(keys, fallback=None) -> tuple[int, list[bool]]:
    """(layers_per_block, up blocks with attention) from LDM UNet key names of a checkpoint."""
    ups: dict[int, bool] = {}
    op = None
    outs = set()
    for k in keys:
        if not k.startswith(UNET_PREFIX):
            continue
        p = k[len(UNET_PREFIX):].split(".")
        if p[0] == "input_blocks" and len(p) > 3 and p[3] == "op":
            op = int(p[1]) if op is None else min(op, int(p[1]))
        if p[0] == "output_blocks":
            outs.add(int(p[1]))
    if op is None:
        return fallback or (2, [True])
    L = op - 1
    n_levels = (max(outs) + 1) // (L + 1) if outs else 1
    for i in range(n_levels):
        first = UNET_PREFIX + f"output_blocks.{i * (L + 1)}.1."
        ups[i] = any(k.startswith(first) and ".transformer_blocks." in k or
                     (k.startswith(first) and ".proj_in." in k) for k in keys)
    return L, [ups[i] for i in range(n_levels)]


# ---------------------------------------------------------------------------------- checkpoint targets
@dataclass(frozen=True)
class Target:
    """The checkpoint tensor a LoRA module patches. ``part``: None, or 0/1/2 for the q/k/v third of
    OpenCLIP's ``in_proj_weight``. ``alias``: a name some loaders accept but kohya would not write."""

    key: str
    shape: tuple
    part: int | None = None
    alias: bool = False


_OPEN_CLIP_MODULES = {
    "self_attn.out_proj": "attn.out_proj.weight",
    "mlp.fc1": "mlp.c_fc.weight",
    "mlp.fc2": "mlp.c_proj.weight",
}


def _te_targets(prefix: str, ldm_prefix: str, layout: str, shapes: dict) -> dict[str, Target]:
    out: dict[str, Target] = {}
    if layout == "hf_clip":
        for k, s in shapes.items():
            if k.startswith(ldm_prefix) and k.endswith(".weight") and len(s) >= 2 and "embeddings" not in k:
                path = k[len(ldm_prefix):-len(".weight")]
                out[te_name(prefix, path)] = Target(k, tuple(s))
        return out
    pat = re.compile(re.escape(ldm_prefix) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
    for k, s in shapes.items():
        m = pat.match(k)
        if not m:
            continue
        n = m.group(1)
        base = f"text_model.encoder.layers.{n}."
        for part, q in enumerate(("q_proj", "k_proj", "v_proj")):
            out[lora_name(prefix, base + "self_attn." + q)] = Target(k, (s[0] // 3,) + tuple(s[1:]), part)
        for mod, ldm in _OPEN_CLIP_MODULES.items():
            key = f"{ldm_prefix}transformer.resblocks.{n}.{ldm}"
            if key in shapes:
                out[lora_name(prefix, base + mod)] = Target(key, tuple(shapes[key]))
    return out


def checkpoint_targets(shapes: dict, family: str) -> dict[str, Target]:
    """Every kohya module name that patches a tensor of this LDM/SAI checkpoint -> its Target.

    ``shapes``: checkpoint key -> shape. UNet modules are listed under the name kohya writes for the
    family and, for SD1/SD2, also under the LDM-path name ComfyUI and A1111 accept (``alias``).
    """
    family = check_family(family)
    out: dict[str, Target] = {}
    structure = unet_structure_from_keys(shapes, DEFAULT_UNET_STRUCTURE[family])
    for k, s in shapes.items():
        if not (k.startswith(UNET_PREFIX) and k.endswith(".weight") and len(s) >= 2):
            continue
        ldm_path = k[len(UNET_PREFIX):-len(".weight")]
        ldm_name = lora_name(UNET_PREFIX_KOHYA, ldm_path)
        if family == "sdxl":
            out[ldm_name] = Target(k, tuple(s))
            continue
        diffusers = ldm_unet_path_to_diffusers(ldm_path, *structure)
        if diffusers is not None:
            out[lora_name(UNET_PREFIX_KOHYA, diffusers)] = Target(k, tuple(s))
            out.setdefault(ldm_name, Target(k, tuple(s), alias=True))
        else:
            out[ldm_name] = Target(k, tuple(s))
    for prefix, ldm_prefix, layout in TEXT_ENCODERS[family]:
        out.update(_te_targets(prefix, ldm_prefix, layout, shapes))
    if family != "sdxl":  # A1111 resolves lora_te1_ for SD1 through a fallback; ComfyUI maps it to clip_l
        for name, t in list(out.items()):
            if name.startswith("lora_te_"):
                out.setdefault("lora_te1_" + name[len("lora_te_"):], Target(t.key, t.shape, t.part, alias=True))
    return out


def module_prefix(name: str) -> str:
    for p in KOHYA_PREFIXES:
        if name.startswith(p):
            return p[:-1]
    return ""
