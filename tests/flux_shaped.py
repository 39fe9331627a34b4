"""A Flux-shaped DiT without ComfyUI: ComfyUI's module names and shapes (comfy/ldm/flux/layers.py: double
blocks with img/txt streams, single blocks with the parallel attention + MLP), in-place residual additions,
frozen weights cast to the compute dtype per op (as ComfyUI's ops do for fp8 weights). Used at full width by
tests/test_gpu_flux_memory.py and tiny by tests/test_estimate_dit.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE = torch.bfloat16


class CastLinear(nn.Linear):
    """A Linear whose weight may be stored in float8: cast to the compute dtype for the matmul."""

    def forward(self, x):
        w = self.weight if self.weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else self.weight.to(COMPUTE)
        b = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(x, w, b)


class QKNorm(nn.Module):
    def __init__(self, head: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head)
        self.key_norm = nn.RMSNorm(head)


def _attention(q, k, v, heads):
    b, t, _ = q.shape
    q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


class Modulation(nn.Module):
    def __init__(self, h: int, n: int):
        super().__init__()
        self.lin = CastLinear(h, n * h)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6))
            attn = nn.Module()
            attn.qkv, attn.proj, attn.norm = CastLinear(h, 3 * h), CastLinear(h, h), QKNorm(h // heads)
            setattr(self, f"{s}_attn", attn)
            setattr(self, f"{s}_mlp", nn.Sequential(CastLinear(h, 4 * h), nn.GELU(approximate="tanh"), CastLinear(4 * h, h)))

    def forward(self, img, txt, vec, transformer_options=None):
        streams = {"img": img, "txt": txt}
        mods, qkvs = {}, {}
        for s, x in streams.items():
            mods[s] = getattr(self, f"{s}_mod").lin(F.silu(vec))[:, None].chunk(6, dim=-1)
            shift, scale, _ = mods[s][:3]
            h = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
            attn = getattr(self, f"{s}_attn")
            q, k, v = attn.qkv(h).chunk(3, dim=-1)
            hd = q.shape[-1] // self.heads
            q = attn.norm.query_norm(q.unflatten(-1, (self.heads, hd))).flatten(-2)
            k = attn.norm.key_norm(k.unflatten(-1, (self.heads, hd))).flatten(-2)
            qkvs[s] = (q, k, v)
        q, k, v = (torch.cat([qkvs["txt"][i], qkvs["img"][i]], dim=1) for i in range(3))
        out = _attention(q, k, v, self.heads)
        n_txt = txt.shape[1]
        for s, part in (("txt", out[:, :n_txt]), ("img", out[:, n_txt:])):
            x = streams[s]
            _, _, gate, shift2, scale2, gate2 = mods[s]
            x += gate * getattr(self, f"{s}_attn").proj(part)  # in place, as ComfyUI's ``img += ...``
            x += gate2 * getattr(self, f"{s}_mlp")(F.layer_norm(x, x.shape[-1:]) * (1 + scale2) + shift2)
        return streams["img"], streams["txt"]


class SingleStreamBlock(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads, self.h = heads, h
        self.linear1 = CastLinear(h, 7 * h)
        self.linear2 = CastLinear(5 * h, h)
        self.norm = QKNorm(h // heads)
        self.modulation = Modulation(h, 3)

    def forward(self, x, vec, transformer_options=None):
        shift, scale, gate = self.modulation.lin(F.silu(vec))[:, None].chunk(3, dim=-1)
        qkv, mlp = self.linear1(F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift).split([3 * self.h, 4 * self.h], -1)
        q, k, v = qkv.chunk(3, dim=-1)
        hd = self.h // self.heads
        q = self.norm.query_norm(q.unflatten(-1, (self.heads, hd))).flatten(-2)
        k = self.norm.key_norm(k.unflatten(-1, (self.heads, hd))).flatten(-2)
        attn = _attention(q, k, v, self.heads)
        x += gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x


class FluxShaped(nn.Module):
    def __init__(self, h: int = 3072, heads: int = 24, doubles: int = 2, singles: int = 4, context: int = 4096):
        super().__init__()
        self.img_in = CastLinear(64, h)
        self.txt_in = CastLinear(context, h)
        self.time_in = nn.Sequential(CastLinear(256, h), nn.SiLU(), CastLinear(h, h))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, heads) for _ in range(doubles))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, heads) for _ in range(singles))
        self.final_layer = nn.Module()
        self.final_layer.linear = CastLinear(h, 64)

    def forward(self, img, txt, t_emb):
        img, txt, vec = self.img_in(img), self.txt_in(txt), self.time_in(t_emb)
        options = {}
        for i, block in enumerate(self.double_blocks):
            options["block_index"] = i
            img, txt = block(img=img, txt=txt, vec=vec, transformer_options=options)
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            options["block_index"] = i
            x = block(x, vec=vec, transformer_options=options)
        return self.final_layer.linear(x[:, txt.shape[1]:])


LORA_TARGETS = r".*(_attn\.(qkv|proj)|_mlp\.(0|2)|_mod\.lin|linear1|linear2|modulation\.lin)$"


def build(h=3072, heads=24, doubles=2, singles=4, context=4096, rank=16, weight_dtype=torch.bfloat16,
          device="cpu", seed=0):
    """The model with LoRA (rank ``rank``, fp32) on every block Linear (the "full" preset), frozen weights in
    ``weight_dtype`` (bf16, or float8_e4m3fn for the Linears)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    with torch.device(device):
        model = FluxShaped(h, heads, doubles, singles, context)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, CastLinear):
            m.weight.data = m.weight.data.to(weight_dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(torch.bfloat16 if weight_dtype != torch.float32 else torch.float32)
        elif isinstance(m, nn.RMSNorm) and weight_dtype != torch.float32:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), model)
    return model


def batch(resolution=1024, text_tokens=512, context=4096, device="cpu", dtype=torch.bfloat16, seed=1):
    """One sample at ``resolution`` px: (H/16)·(W/16) tokens of 2x2-patched 16-channel latents, the caption's
    tokens, a timestep embedding, a target."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = (resolution // 16) ** 2
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return make(1, n, 64), make(1, text_tokens, context), make(1, 256), make(1, n, 64)


def train_steps(model, steps, device, resolution=1024, text_tokens=512, context=4096, copy_saved=False):
    """``steps`` bf16-autocast AdamW steps; returns the losses. ``copy_saved``: copy saved activations, as
    nodes/comfy_model.py does around ComfyUI's forward (needed by the in-place blocks without checkpointing)."""
    import contextlib

    from dit_stack import copy_saved_activations

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    device_type = torch.device(device).type
    for step in range(steps):
        img, txt, t, target = batch(resolution, text_tokens, context, device, seed=step)
        with torch.autocast(device_type, dtype=torch.bfloat16), \
                (copy_saved_activations() if copy_saved else contextlib.nullcontext()):
            loss = F.mse_loss(model(img, txt, t).float(), target.float())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
