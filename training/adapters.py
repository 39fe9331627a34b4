"""Adapters: which modules get an adapter (presets, custom patterns) and attaching it through peft.

Adapter types: LoRA, DoRA (``LoraConfig(use_dora=True)``), LoHa and LoKr (peft's LyCORIS tuners), all
attached through peft's ``inject_adapter_in_model`` (:func:`add_adapter`). Target presets:

- ``attention``: the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``);
- ``attention_ff``: kohya's default: attention + feed-forward (``ff.net.0.proj``, ``ff.net.2``) + the
  transformer blocks' ``proj_in``/``proj_out``;
- ``full``: ``attention_ff`` + the ResNet convolutions (``conv1``, ``conv2``, ``conv_shortcut``) and the
  down/up-sampler convolutions: LoCon. 3x3 convolutions get ``conv_rank``/``conv_alpha``;
- ``custom``: ``target_modules``, a regex (matched against the full module name) or comma-separated names.

Text encoders get the attention projections (``attention``) or attention + MLP (other presets).
"""

from __future__ import annotations

import re

import torch

from . import devices
from .models.hosted import is_hosted
from .seeds import mix

_UNET_ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_UNET_FF = r"ff\.net\.(0\.proj|2)"
_UNET_PROJ = r"attentions\.\d+\.(proj_in|proj_out)"
_UNET_CONV3 = r"(resnets\.\d+\.(conv1|conv2)|(downsamplers|upsamplers)\.0\.conv)"
_UNET_CONV1 = r"resnets\.\d+\.conv_shortcut"

ATTENTION_TARGETS = rf".*{_UNET_ATTENTION}$"

TARGET_PATTERNS = {
    "attention": ATTENTION_TARGETS,
    "attention_ff": rf".*({_UNET_ATTENTION}|{_UNET_FF}|{_UNET_PROJ})$",
    "full": rf".*({_UNET_ATTENTION}|{_UNET_FF}|{_UNET_PROJ}|{_UNET_CONV3}|{_UNET_CONV1})$",
}
TE_TARGETS = {
    "attention": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "mlp": r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$",
}
_REGEX_CHARS = set(".*+?[](){}|^$\\")


class AdapterError(ValueError):
    """An adapter setting that cannot be applied; the message names the key and the fix."""


def unet_targets(target: str, custom: str = ""):
    if target == "custom":
        custom = custom.strip()
        if any(c in _REGEX_CHARS for c in custom):
            try:
                re.compile(custom)
            except re.error as e:
                raise AdapterError(f"target_modules = {custom!r}: not a valid regex ({e})") from None
            return custom
        return [name.strip() for name in custom.split(",") if name.strip()]
    return TARGET_PATTERNS[target]


def denoiser_targets(base, config):
    """peft target modules of the denoiser: a preset's pattern (a hosted model's own for its presets), or the
    user's ``target_modules``."""
    if is_hosted(base) and config.target != "custom":
        return base.adapter_pattern(config.target)
    return unet_targets(config.target, config.target_modules)


def te_targets(target: str) -> str:
    return TE_TARGETS["attention" if target == "attention" else "mlp"]


def make_peft_config(adapter: str, rank: int, alpha: float, targets, *, conv_rank: int = 0, conv_alpha: float = 0.0,
                     rslora: bool = False, conv: bool = False):
    """The peft config for one model. ``conv``: give 3x3 convolutions their own rank/alpha (LoCon)."""
    rank_pattern, alpha_pattern = {}, {}
    if conv and (conv_rank or conv_alpha):
        c_rank = conv_rank or rank
        rank_pattern[_UNET_CONV3] = c_rank
        alpha_pattern[_UNET_CONV3] = conv_alpha or float(c_rank)
    if rslora and adapter not in ("lora", "dora"):
        raise AdapterError(f"rslora = true applies to adapter = 'lora' or 'dora', not {adapter!r}")
    if adapter in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                          use_dora=adapter == "dora", use_rslora=rslora,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if adapter == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if adapter == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    raise AdapterError(f"adapter = {adapter!r}: use one of lora, loha, lokr, dora")


def add_adapter(model, peft_config, adapter_name: str = "default") -> None:
    """Attach ``peft_config`` to ``model`` (a diffusers or transformers model, or any torch module).

    What diffusers' and transformers' ``model.add_adapter`` do, through peft itself: their wrappers gate on
    their own minimum peft versions (transformers 5.24 refuses peft < 0.22, which may not be installable
    beside ComfyUI's stack), and the wrapper adds nothing that training or export needs.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    existing = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in existing:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    inject_adapter_in_model(peft_config, model, adapter_name)
    model.peft_config = {**existing, adapter_name: peft_config}  # peft keeps only the newest tuner's configs
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapter_name)


def remove_adapters(model) -> int:
    """Put every peft layer's base layer back where peft put the wrapper (unmerged: the base weights are as
    they were) and drop ``model.peft_config``; returns the number of layers. For a model trained in place that
    its owner keeps using (ComfyUI's MODEL patches weights by their original module paths)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return len(layers)


def _attach(model, peft_config, what: str, adapter_name: str):
    model.requires_grad_(False)
    try:
        add_adapter(model, peft_config, adapter_name)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise AdapterError(f"no module of the {what} matched the target modules: {e}") from None
        raise
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterError(f"no module of the {what} matched the target modules")
    return params


def attach_lora(unet, rank: int, alpha: float, target: str = "attention", adapter_name: str = "default"):
    """Add a trainable LoRA to ``unet`` (frozen otherwise) and return its trainable parameters.

    peft's default init matches kohya's: lora_A (down) kaiming-uniform, lora_B (up) zeros, so the
    adapter starts as a no-op. The caller seeds torch's RNG first for a repeatable init.
    """
    config = make_peft_config("lora", rank, alpha, unet_targets(target))
    return _attach(unet, config, "UNet", adapter_name)


def attach_adapters(base, config, adapter_name: str = "default", adjust=None) -> dict[str, list]:
    """Attach the configured adapter to the UNet and (if trained) the text encoders.

    Returns {"unet": [params], "text_encoders": [[params], ...]}; untrained models get no adapter and
    stay frozen. The caller seeds torch's RNG first. ``adjust(peft_config, model)``, if given, may change
    each model's peft config before it is attached (continuing from a file: ``continuation.py``).
    """
    adjust = adjust or (lambda peft_config, model: peft_config)
    groups = {"unet": [], "text_encoders": []}
    if config.train_unet:
        peft_config = make_peft_config(
            config.adapter, config.rank, config.alpha, denoiser_targets(base, config),
            conv_rank=config.conv_rank, conv_alpha=config.conv_alpha, rslora=config.rslora,
            conv=config.target in ("full", "custom"),
        )
        groups["unet"] = _attach(base.unet, adjust(peft_config, base.unet), "UNet", adapter_name)
    else:
        base.unet.requires_grad_(False)
    for i, encoder in enumerate(base.text_encoders):
        if config.train_text_encoder:
            peft_config = make_peft_config(config.adapter, config.rank, config.alpha, te_targets(config.target),
                                           rslora=config.rslora)
            groups["text_encoders"].append(_attach(encoder, adjust(peft_config, encoder), f"text encoder {i + 1}",
                                                   adapter_name))
        else:
            encoder.requires_grad_(False)
    return groups


# ---------------------------------------------------------------------------------------------
# QLoRA: a 4-bit base through bitsandbytes (CUDA, or the CPU with bitsandbytes' CPU backend)
# ---------------------------------------------------------------------------------------------

def _nf4_linear(linear: torch.nn.Linear, compute_dtype):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q


def check_quantize_available(device, compute_dtype=torch.float32) -> None:
    """Refuse QLoRA, before a model is loaded, where bitsandbytes cannot run NF4 layers on ``device``.

    Asked of bitsandbytes itself (a 64x64 layer, forward and backward) rather than of the device type:
    CUDA has its kernels, and bitsandbytes >= 0.48 ships a CPU backend too.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise AdapterError("quantize_base = '4bit' needs the bitsandbytes package (CUDA GPUs, or the CPU with "
                           "bitsandbytes >= 0.48): pip install bitsandbytes") from None
    try:
        layer = _nf4_linear(torch.nn.Linear(64, 64), compute_dtype).to(device)
        x = torch.randn(2, 64, device=device, dtype=compute_dtype, requires_grad=True)
        layer(x).float().sum().backward()
    except Exception as e:  # no kernels for this device in this bitsandbytes build
        raise AdapterError(
            f"quantize_base = '4bit' (QLoRA): bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit "
            f"layers on {device} ({type(e).__name__}: {e}); use a CUDA GPU (or bitsandbytes >= 0.48 on the CPU), "
            "or quantize_base = 'none'") from None


def quantize_linear_4bit(model, device, compute_dtype=torch.bfloat16) -> int:
    """Replace the model's nn.Linear layers by bitsandbytes NF4 layers on ``device`` (before attaching)."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, _nf4_linear(child, compute_dtype).to(device))
                count += 1
    return count


# ---------------------------------------------------------------------------------------------
# LoRA+: the up (B) matrices learn ratio times faster (kohya networks/lora.py prepare_optimizer_params)
# ---------------------------------------------------------------------------------------------

def _is_lora_up(name: str) -> bool:
    return ".lora_B." in name


def optimizer_param_groups(base, config, unet_params: list, te_params: list) -> list[dict]:
    """The optimizer's parameter groups: the UNet's at ``learning_rate``, the text encoders' at their rate.

    With LoRA+ (``loraplus_lr_ratio``, or the per-model ``loraplus_unet_lr_ratio`` /
    ``loraplus_text_encoder_lr_ratio``, which win as in kohya) a model's group is split: its up matrices
    (peft ``lora_B``, kohya ``lora_up``) go to a second group at lr * ratio, everything else (down
    matrices, DoRA magnitudes) stays at lr. The first group is always the UNet's (or the text encoders')
    base group, whose lr the step events report.
    """
    up_ids = set()
    for model in [base.unet, *base.text_encoders]:
        for name, p in model.named_parameters():
            if p.requires_grad and _is_lora_up(name):
                up_ids.add(id(p))
    groups = []

    def add(params, lr, ratio):
        if not params:
            return
        if not ratio:
            groups.append({"params": list(params), "lr": lr})
            return
        rest = [p for p in params if id(p) not in up_ids]
        up = [p for p in params if id(p) in up_ids]
        if not up:
            raise AdapterError("loraplus_lr_ratio: this adapter has no LoRA up (B) matrices; "
                               "LoRA+ applies to adapter = 'lora' or 'dora'")
        if rest:
            groups.append({"params": rest, "lr": lr})
        groups.append({"params": up, "lr": lr * ratio})

    add(unet_params, config.learning_rate, config.loraplus_unet_lr_ratio or config.loraplus_lr_ratio)
    add(te_params, config.effective_text_encoder_lr,
        config.loraplus_text_encoder_lr_ratio or config.loraplus_lr_ratio)
    return groups


# ---------------------------------------------------------------------------------------------
# kohya's network_dropout / rank_dropout / module_dropout on peft LoRA layers
# ---------------------------------------------------------------------------------------------

class LoraDropout:
    """kohya's three LoRA dropouts (networks/lora.py ``LoRAModule.forward``) as forward hooks on every peft
    LoRA layer's down projection (``lora_A``), whose output ``lx`` (rank channels) they multiply by a mask:

    - ``network_dropout`` p: each element of ``lx`` is zeroed with probability p, the rest scaled 1/(1-p);
    - ``rank_dropout`` p: each rank channel is zeroed (for all tokens / pixels of the sample) with
      probability p, and the update scaled 1/(1-p) ("as if the rank changed");
    - ``module_dropout`` p: the whole LoRA of the layer is skipped (``lx`` zeroed) with probability p.

    Since the up projection is linear and bias-free, masking ``lx`` is exactly kohya's computation. For
    DoRA the masks act on the low-rank path (the magnitude still applies), so ``module_dropout`` is
    refused there. Unlike kohya (one draw per batch from the global RNG), each *sample* draws its masks:
    the loop passes one seed per sample of the batch (``set_seeds``), and a layer's masks for a sample come
    from a generator seeded by (that seed, the layer's name), so they are the same whatever the batch
    layout, the number of processes, a resume, or a gradient-checkpointing recomputation.

    peft's DoRA Linear computes its weight as ``lora_B(lora_A(eye))``; the hooks leave that call alone.

    The masks apply only while ``set_seeds`` holds seeds, the layer is in training mode and autograd
    records (``torch.is_grad_enabled()``): sampling (``no_grad``, ``eval``), inference and export never
    see them.
    """

    def __init__(self, network_dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        self.p_element, self.p_rank, self.p_module = float(network_dropout), float(rank_dropout), \
            float(module_dropout)
        self.seeds: list[int] | None = None
        self.handles = []
        self.layers = 0

    @property
    def active(self) -> bool:
        return self.p_element > 0 or self.p_rank > 0 or self.p_module > 0

    def attach(self, model, prefix: str, adapter_name: str = "default") -> int:
        """Hook the down projection of every LoRA layer of ``model``; ``prefix`` names the model."""
        import zlib

        from peft.tuners.lora import LoraLayer

        count = 0
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                key = zlib.crc32(f"{prefix}.{name}".encode())
                down = module.lora_A[adapter_name]
                conv = isinstance(down, torch.nn.Conv2d) or (hasattr(down, "weight") and down.weight.dim() == 4)
                self.handles.append(down.register_forward_hook(self._hook(key, conv)))
                count += 1
        self.layers += count
        return count

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def set_seeds(self, seeds: list[int] | None):
        """One seed per sample of the coming forward passes (None: no dropout)."""
        self.seeds = list(seeds) if seeds is not None else None

    def mask(self, seed: int, key: int, shape, conv: bool, device, dtype) -> torch.Tensor:
        """The multiplier for one sample's ``lx`` of ``shape`` (without the batch dimension). The module and
        rank draws come from a CPU generator (the same on every device); the element mask from one on
        ``device``."""
        layer_seed = mix(seed, key)
        g = torch.Generator().manual_seed(layer_seed)
        if self.p_module > 0 and float(torch.rand(1, generator=g)) < self.p_module:
            return torch.zeros((1,) * len(shape), device=device, dtype=dtype)
        m = None
        if self.p_rank > 0:
            rank = shape[0] if conv else shape[-1]
            keep = (torch.rand(rank, generator=g) > self.p_rank).float() / (1 - self.p_rank)
            m = (keep.view(rank, *([1] * (len(shape) - 1))) if conv else keep.view(*([1] * (len(shape) - 1)), rank))
            m = m.to(device)
        if self.p_element > 0:
            gd = devices.generator(device, layer_seed ^ 0x5DEECE66D)
            e = (torch.rand(shape, generator=gd, device=device) >= self.p_element).float() / (1 - self.p_element)
            m = e if m is None else m * e
        if m is None:
            return torch.ones((1,) * len(shape), device=device, dtype=dtype)
        return m.to(dtype)

    def _hook(self, key: int, conv: bool):
        def hook(module, inputs, output):
            if self.seeds is None or not module.training or not torch.is_grad_enabled():
                return None
            x = inputs[0] if inputs else None
            if x is not None and x.dim() == 2 and x.shape[0] == x.shape[1] and \
                    torch.equal(x, torch.eye(x.shape[0], device=x.device, dtype=x.dtype)):
                return None  # peft's DoRA reads the weight as lora_B(lora_A(eye)): not a sample
            if output.shape[0] != len(self.seeds):
                raise RuntimeError(f"LoRA dropout: a batch of {output.shape[0]} reached a LoRA layer, but "
                                   f"{len(self.seeds)} sample seeds were set")
            shape = output.shape[1:]
            masks = [self.mask(s, key, shape, conv, output.device, output.dtype) for s in self.seeds]
            return output * torch.stack([m.expand(shape) for m in masks])
        return hook


def attach_dropout(base, config, adapter_name: str = "default") -> LoraDropout | None:
    """A ``LoraDropout`` hooked into the trained models' LoRA layers, or None when all three are 0."""
    dropout = LoraDropout(config.network_dropout, config.rank_dropout, config.module_dropout)
    if not dropout.active:
        return None
    if config.adapter not in ("lora", "dora") or (config.module_dropout > 0 and config.adapter != "lora"):
        raise AdapterError("network_dropout / rank_dropout apply to adapter = 'lora' or 'dora', module_dropout "
                           f"to 'lora'; adapter = {config.adapter!r}")
    if config.train_unet:
        dropout.attach(base.unet, "unet", adapter_name)
    if config.train_text_encoder:
        for i, encoder in enumerate(base.text_encoders):
            dropout.attach(encoder, f"te{i + 1}", adapter_name)
    return dropout


# ---------------------------------------------------------------------------------------------
# scale_weight_norms: kohya's max-norm regularisation of each LoRA delta (apply_max_norm_regularization)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def apply_max_norm(models, max_norm: float, adapter_name: str = "default") -> tuple[int, float, float]:
    """Scale every LoRA layer whose delta ``scaling * B @ A`` has a Frobenius norm above ``max_norm`` back
    to ``max_norm``, multiplying A and B by sqrt(max_norm / norm) each, as kohya does after every optimizer
    step. Returns (layers scaled, mean norm after, max norm after)."""
    from peft.tuners.lora import LoraLayer

    scaled, norms = 0, []
    for model in models:
        for module in model.modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            down = module.lora_A[adapter_name].weight
            up = module.lora_B[adapter_name].weight
            delta = (up.float().flatten(1) @ down.float().flatten(1)) * float(module.scaling[adapter_name])
            norm = delta.norm().clamp(min=max_norm / 2)
            ratio = float(torch.clamp(norm, max=max_norm) / norm)
            if ratio != 1:
                scaled += 1
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
            norms.append(float(delta.norm()) * ratio)
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
