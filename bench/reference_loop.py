"""A reference loop with the semantics of diffusers' examples/text_to_image/train_text_to_image_lora.py.

What it keeps from that script, on purpose: every step loads and transforms its images, runs the VAE
encoder and the text encoder, then the UNet forward/backward and AdamW; LoRA on the UNet's attention
projections (to_q, to_k, to_v, to_out.0) through peft's ``add_adapter``; MSE on epsilon; gradient
clipping. What it leaves out: the DataLoader worker processes, logging and checkpointing, which would
only add time. It is what our trainer is compared against, not part of the product.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def train_reference(
    checkpoint, tokenizer_dir, dataset_dir, steps, rank, alpha, resolution, batch_size, seed, lr=1e-4, on_step=None
):
    from peft import LoraConfig

    from ..training.dataset import image_to_tensor, load_dataset, load_image, resize_and_crop
    from ..training.models import load_base_model

    torch.manual_seed(seed)
    random.seed(seed)
    base = load_base_model(checkpoint, tokenizer_dir)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoders[0], base.tokenizers[0]
    scheduler = base.noise_scheduler
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    items = load_dataset(dataset_dir).items
    losses = []
    for _ in range(steps):
        batch = [random.choice(items) for _ in range(batch_size)]
        pixels = []
        for item in batch:
            image, _ = resize_and_crop(load_image(item.image_path), resolution, resolution, "center")
            tensor = image_to_tensor(image)
            pixels.append(tensor.flip(-1) if random.random() < 0.5 else tensor)
        pixels = torch.stack(pixels)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer([i.caption for i in batch], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            hidden = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses))
    return losses
