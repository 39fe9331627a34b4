"""Adapters: which modules get a LoRA, and attaching it through peft."""

from __future__ import annotations

# Attention projections of every transformer block (self- and cross-attention). The VAE's attention is
# never touched because adapters are attached to the UNet only.
ATTENTION_TARGETS = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"

TARGET_PATTERNS = {"attention": ATTENTION_TARGETS}


def attach_lora(unet, rank: int, alpha: float, target: str = "attention", adapter_name: str = "default"):
    """Add a trainable LoRA to ``unet`` (frozen otherwise) and return its trainable parameters.

    peft's default init matches kohya's: lora_A (down) kaiming-uniform, lora_B (up) zeros, so the
    adapter starts as a no-op. The caller seeds torch's RNG first for a repeatable init.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=TARGET_PATTERNS[target],
        init_lora_weights=True,
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"no module of the UNet matched the '{target}' target preset")
    return params
