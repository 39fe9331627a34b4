"""Adapters: the base model placed on the device, LoRA (or LoHa, LoKr, DoRA) layers attached, the optimizer
and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ..adapters import attach_adapters, attach_dropout, optimizer_param_groups, quantize_linear_4bit
from ..base_options import CompileUnavailable, Fp8Unavailable, compile_unet, store_frozen_in_fp8
from ..models.hosted import is_hosted
from ..models.loader import move_module
from ..optim import make_lr_scheduler, make_optimizer
from .context import RunContext, TrainingError
from .data import Data


@dataclass
class Trainable:
    unet: torch.nn.Module  # wrapped by the accelerator when the UNet trains
    unet_params: list
    te_params: list
    optimizer: object
    lr_scheduler: object
    dropout: object | None  # adapters.LoraDropout hooks, or None

    @property
    def all_params(self) -> list:
        return self.unet_params + self.te_params

    def models(self, ctx: RunContext, base) -> dict:
        """The modules whose adapters train, by the names a state file uses."""
        models = {}
        if ctx.config.train_unet:
            models["unet"] = ctx.accelerator.unwrap_model(self.unet)
        if ctx.config.train_text_encoder:
            for i, te in enumerate(base.text_encoders):
                models[f"te{i + 1}"] = te
        return models


def place_base(ctx: RunContext, base, data: Data) -> None:
    """The frozen base on the device in the run's precision (text encoders and VAE only where needed)."""
    config, device, weight_dtype = ctx.config, ctx.device, ctx.weight_dtype
    if is_hosted(base):  # the host loads its model its way; its text encoders and VAE leave the device
        encode_every_step = not data.captions_encoded_once
        base.place(device, weight_dtype, config.gradient_checkpointing, encode_every_step)
        if encode_every_step:
            size = base.text_encoder_bytes()
            ctx.log("caption augmentation: the captions are encoded at every step, so the text encoders stay on "
                    "the device beside the model" + (f" (about {size / 2**30:.1f} GiB more)" if size else "")
                    + "; with fixed captions they are encoded once and leave it")
        return
    unet = base.unet
    if config.quantize_base == "4bit":
        n = quantize_linear_4bit(unet, device, compute_dtype=weight_dtype)
        ctx.log(f"QLoRA: {n} UNet linear layers stored in 4 bit (NF4)")
    # One .to(device, dtype) converts tensor by tensor: the device never holds the fp32 UNet (10 GB for
    # SDXL) on the way to bf16/fp16, which .to(device) followed by .to(dtype) did.
    move_module(unet, device, weight_dtype if weight_dtype != torch.float32 else None)
    te_on_device = config.train_text_encoder or not data.captions_encoded_once
    for encoder in base.text_encoders:
        encoder.to(device if te_on_device else "cpu")
        if weight_dtype != torch.float32 and config.train_text_encoder:
            encoder.to(dtype=weight_dtype)
    if data.latent_cache is None:
        base.vae.to(device)
    unet.set_attn_processor(AttnProcessor2_0() if config.attention == "sdpa" else AttnProcessor())
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in base.text_encoders:
                enable = getattr(encoder, "activation_checkpointing_enable", None) \
                    or encoder.gradient_checkpointing_enable
                enable()


def attach_trainable(ctx: RunContext, base, continuation=None) -> Trainable:
    """Adapters on the placed base (shaped and filled from ``continuation``'s file, if any), the frozen
    weights' storage options, the optimizer and the schedule, prepared by the accelerator."""
    config, device, unet = ctx.config, ctx.device, base.unet
    torch.manual_seed(config.seed)
    if continuation is not None:
        continuation.prepare(base, config)
    groups = attach_adapters(base, config, adjust=continuation and continuation.adjust)
    unet_params = groups["unet"]
    te_params = [p for ps in groups["text_encoders"] for p in ps]
    for p in unet_params + te_params:
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    if continuation is not None:
        n = continuation.load()
        ctx.log(f"continuing from {config.network_weights}: {n} {config.adapter} modules loaded "
                f"(rank {config.rank}, alpha {config.alpha:g})" + "".join(f"; {note}" for note in continuation.notes))
    if config.fp8_base:  # kohya's fp8_base: frozen Linear/Conv weights in float8, upcast per layer
        try:
            n = store_frozen_in_fp8(unet) + sum(store_frozen_in_fp8(te) for te in base.text_encoders)
        except Fp8Unavailable as e:
            raise TrainingError(str(e)) from None
        ctx.log(f"fp8_base: {n} frozen layers stored in float8 (e4m3fn)")
    if config.torch_compile:
        try:
            compile_unet(unet, device)
        except CompileUnavailable as e:
            raise TrainingError(str(e)) from None
        ctx.log("torch_compile: the UNet is compiled on its first step (minutes on a CPU)")
    if is_hosted(base) and config.blocks_to_swap not in (0, "auto"):  # the adapters stay on the device
        base.swap_blocks(int(config.blocks_to_swap), device)
        ctx.log(f"block swap: the frozen weights of {config.blocks_to_swap} blocks wait in CPU memory between uses")
    param_groups = optimizer_param_groups(base, config, unet_params, te_params)  # LoRA+ splits
    dropout = attach_dropout(base, config)
    optimizer = make_optimizer(config.optimizer, param_groups, config.learning_rate, config.weight_decay,
                               config.optimizer_args, device)
    lr_scheduler = make_lr_scheduler(config.lr_scheduler, optimizer, config.warmup_steps(), config.steps,
                                     config.lr_scheduler_num_cycles, config.lr_scheduler_power)
    if config.train_unet and not is_hosted(base):
        unet, optimizer = ctx.accelerator.prepare(unet, optimizer)
    else:
        optimizer = ctx.accelerator.prepare(optimizer)
    unet.train()
    return Trainable(unet, unet_params, te_params, optimizer, lr_scheduler, dropout)
