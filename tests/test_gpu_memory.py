"""GPU-only memory checks (skipped without CUDA; bench/ measures the figures)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_unet_goes_to_the_gpu_in_the_training_dtype_without_an_fp32_copy(tmp_path):
    """SD1.5-shaped UNet, bf16: moving it must never hold its fp32 weights on the GPU (3.4 GB vs 1.7 GB)."""
    from comfyui_lora_trainer.training.config import TrainConfig
    from types import SimpleNamespace

    from comfyui_lora_trainer.training.models import build_components
    from comfyui_lora_trainer.training.stages.trainable import place_base

    components = build_components("sd1", seed=0)
    unet_bf16_bytes = sum(p.numel() * 2 for p in components.unet.parameters())
    config = TrainConfig(checkpoint="unused", dataset="unused", output_dir="", precision="bf16", device="cuda")
    ctx = SimpleNamespace(config=config, device=torch.device("cuda"), weight_dtype=torch.bfloat16,
                          log=lambda message: None)
    data = SimpleNamespace(text_cache=None, captions_fixed=True, latent_cache=object())
    torch.cuda.reset_peak_memory_stats()
    place_base(ctx, components, data)
    weight = next(components.unet.parameters())
    assert weight.device.type == "cuda" and weight.dtype == torch.bfloat16  # the move happened
    assert torch.cuda.max_memory_allocated() < 1.3 * unet_bf16_bytes
