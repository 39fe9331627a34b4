"""The CUDA paths, on the tiny model (skipped without CUDA; they take seconds on a GPU): fp16 training with
loss scaling, bf16, QLoRA and 8-bit AdamW through bitsandbytes' CUDA kernels."""

import math

import pytest
import torch

from tiny_runs import run, tensors_differ

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def plain_cuda():
    return run(device="cuda", steps=3)[0]


def test_fp16_trains_with_loss_scaling(monkeypatch, plain_cuda):
    scaled = []
    original = torch.amp.GradScaler.scale

    def counting(self, outputs):
        scaled.append(self.get_scale())
        return original(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", counting)
    events = []
    result, _ = run(device="cuda", steps=3, precision="fp16", events=events.append)
    assert len(scaled) == 3 and scaled[0] > 1  # every backward went through accelerate's GradScaler
    assert all(math.isfinite(v) for v in result.losses) and tensors_differ(result, plain_cuda)
    assert all(v.dtype == torch.float32 for v in result.lora.tensors.values())  # adapters stay fp32
    assert any("precision fp16" in e.get("message", "") for e in events)


def test_bf16_on_cuda(plain_cuda):
    result, _ = run(device="cuda", steps=3, precision="bf16")
    assert all(math.isfinite(v) for v in result.losses) and tensors_differ(result, plain_cuda)


def test_qlora_and_adamw8bit_on_cuda(plain_cuda):
    bnb = pytest.importorskip("bitsandbytes")
    events = []
    result, base = run(device="cuda", steps=3, quantize_base="4bit", precision="bf16", optimizer="adamw8bit",
                       optimizer_args={"min_8bit_size": 1}, events=events.append)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.unet.modules()) > 0
    assert all(math.isfinite(v) for v in result.losses) and tensors_differ(result, plain_cuda)
    assert result.lora.metadata["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
