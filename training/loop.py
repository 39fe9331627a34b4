"""The training run, top to bottom: dataset -> cache -> base model -> adapters -> loop -> export.

Hosts (the ComfyUI nodes, the CLI) call ``train(config, events=..., should_stop=...)``. Events are plain
dicts (``{"type": "step", ...}``); ``should_stop`` is polled once per optimizer step and ends the run
early, keeping what was learned.

Randomness is drawn per sample from generators seeded by (seed, sample number), not from one stream:
the same seed gives the same run whatever the batch layout, and a run resumed at step N draws exactly
what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from .adapters import attach_lora
from .config import TrainConfig
from .dataset import Dataset, image_to_tensor, load_dataset, load_image, resize_and_crop

log = logging.getLogger("comfyui_lora_trainer")

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_MASK63 = (1 << 63) - 1


@dataclass
class TrainResult:
    lora: object  # formats.LoraWeights
    path: str | None
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    config: TrainConfig | None = None


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def sample_generator(seed: int, sample_number: int) -> torch.Generator:
    """A CPU generator for one training sample: its flip, timestep and noise."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample_number * 7_919 + 1) & _MASK63)


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    generator = torch.Generator().manual_seed((seed * 104_729 + epoch + 17) & _MASK63)
    return torch.randperm(size, generator=generator).tolist()


def output_path(config: TrainConfig) -> str:
    return os.path.join(config.output_dir, config.output_name + ".safetensors")


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger or trigger.lower() in caption.lower():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


@dataclass
class SampleCache:
    """Per dataset item: VAE latents (and of the mirrored image) and text-encoder outputs."""

    latents: list[torch.Tensor]
    flipped_latents: list[torch.Tensor] | None
    hidden_states: list[torch.Tensor]
    added_cond: list[dict] | None


@torch.no_grad()
def build_cache(base, dataset: Dataset, config: TrainConfig, device, emit) -> SampleCache:
    from .models import encode_images, encode_prompts

    resolution = config.resolution
    vae_dtype = next(base.vae.parameters()).dtype
    base.vae.to(device)
    # latents are sampled from the VAE's distribution once per run (as kohya caches them), seeded
    generator = torch.Generator(device=device).manual_seed(config.seed)
    latents, flipped, hidden, added = [], [] if config.flip else None, [], []
    sizes = []
    for index, item in enumerate(dataset.items):
        image = load_image(item.image_path)
        original = (image.height, image.width)
        image, (top, left) = resize_and_crop(image, resolution, resolution, "center")
        sizes.append((original[0], original[1], top, left, resolution, resolution))
        pixels = image_to_tensor(image).unsqueeze(0)
        batch = torch.cat([pixels, pixels.flip(-1)]) if config.flip else pixels
        encoded = encode_images(base, batch.to(device, vae_dtype), generator=generator).float().cpu()
        latents.append(encoded[0])
        if config.flip:
            flipped.append(encoded[1])
        emit({"type": "cache", "done": index + 1, "total": dataset.num_images})
    base.vae.to("cpu")
    for encoder in base.text_encoders:
        encoder.to(device)
    for item, size in zip(dataset.items, sizes):
        cond = encode_prompts(base, [with_trigger(item.caption, config.trigger_word)], sizes=[size])
        hidden.append(cond.encoder_hidden_states[0].float().cpu())
        if cond.added_cond_kwargs:
            added.append({k: v[0].float().cpu() for k, v in cond.added_cond_kwargs.items()})
    for encoder in base.text_encoders:
        encoder.to("cpu")
    return SampleCache(latents, flipped, hidden, added or None)


def make_accelerator(config: TrainConfig, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The precision is fixed per AcceleratorState; a host that trains several times in one process
    # (ComfyUI, the tests) must be free to change it between runs.
    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        mixed_precision=PRECISION_TO_ACCELERATE[config.precision],
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )


def train(config: TrainConfig, base=None, events=None, should_stop=None) -> TrainResult:
    """Run one training from ``config``; see the module docstring. Returns the LoRA and its file."""
    config.validate()
    emit = events or (lambda event: None)
    stop = should_stop or (lambda: False)
    # Hosts such as ComfyUI run nodes under inference_mode; autograd needs it off, and every tensor on
    # the backward path must be created (models loaded, caches built) inside this block.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(config, base, emit, stop)


def _train(config: TrainConfig, base, emit, stop) -> TrainResult:
    from .formats import LoraWeights, RunInfo, kohya_state_dict_from_models, make_metadata, save_lora_file
    from .models import load_base_model

    started = time.time()
    started_at = datetime.now(timezone.utc)
    path = output_path(config) if config.output_dir else None
    if path and os.path.exists(path) and not config.overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another output name or enable overwrite"
        )
    dataset = load_dataset(config.dataset)
    for warning in dataset.warnings[:20]:
        emit({"type": "log", "message": f"warning: {warning}"})

    device = resolve_device(config.device)
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    if device.type == "cpu" and weight_dtype == torch.float16:
        raise TrainingError("precision = 'fp16' needs a GPU; use 'bf16' or 'fp32' on the CPU")
    torch.manual_seed(config.seed)
    if base is None:
        emit({"type": "log", "message": f"loading {config.checkpoint}"})
        base = load_base_model(config.checkpoint, config.tokenizer, family=config.family)
    emit({"type": "log", "message": f"model family {base.family}, device {device}, precision {config.precision}"})

    cache = build_cache(base, dataset, config, device, emit)
    scheduler = base.noise_scheduler
    unet = base.unet
    unet.to(device)
    if weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)
    torch.manual_seed(config.seed)
    params = attach_lora(unet, config.rank, config.alpha, config.target)
    for p in params:
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    accelerator = make_accelerator(config, device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    num_timesteps = scheduler.config.num_train_timesteps

    epoch_size = dataset.num_samples
    item_of_sample = dataset.epoch_indices()
    orders: dict[int, list[int]] = {}
    losses: list[float] = []
    sample_number = 0
    stopped = False
    step = 0
    emit({"type": "start", "total": config.steps, "images": dataset.num_images, "samples": epoch_size})
    for step in range(1, config.steps + 1):
        step_loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            latents, noise, timesteps, hidden, added = [], [], [], [], []
            for _ in range(config.batch_size):
                epoch, position = divmod(sample_number, epoch_size)
                if epoch not in orders:
                    orders = {epoch: epoch_order(config.seed, epoch, epoch_size)}
                item = item_of_sample[orders[epoch][position]]
                generator = sample_generator(config.seed, sample_number)
                sample_number += 1
                flip = cache.flipped_latents is not None and bool(torch.randint(0, 2, (1,), generator=generator))
                latent = cache.flipped_latents[item] if flip else cache.latents[item]
                latents.append(latent)
                timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
                noise.append(torch.randn(latent.shape, generator=generator))
                hidden.append(cache.hidden_states[item])
                if cache.added_cond:
                    added.append(cache.added_cond[item])
            latents = torch.stack(latents).to(device)
            noise = torch.stack(noise).to(device)
            timesteps = torch.cat(timesteps).to(device)
            hidden = torch.stack(hidden).to(device, weight_dtype)
            added_cond = (
                {k: torch.stack([a[k] for a in added]).to(device, weight_dtype) for k in added[0]} if added else None
            )
            with accelerator.accumulate(unet):
                noisy = scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
                if base.prediction_type == "v_prediction":
                    target = scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
                loss = F.mse_loss(prediction.float(), target.float())
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step}; lower learning_rate or use fp32/bf16"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / config.gradient_accumulation_steps
        losses.append(step_loss)
        emit(
            {
                "type": "step",
                "step": step,
                "total": config.steps,
                "loss": step_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed": time.time() - started,
            }
        )
        if stop():
            stopped = True
            break

    unet = accelerator.unwrap_model(unet)
    unet.eval()
    tensors = kohya_state_dict_from_models(base.family, unet=unet)
    finished_at = datetime.now(timezone.utc)
    info = RunInfo(
        family=base.family,
        output_name=config.output_name,
        network_dim=config.rank,
        network_alpha=config.alpha,
        base_model_name=os.path.basename(config.checkpoint or base.source or ""),
        resolution=config.resolution,
        steps=step,
        max_train_steps=config.steps,
        epoch=(sample_number + epoch_size - 1) // epoch_size,
        learning_rate=config.learning_rate,
        unet_lr=config.learning_rate,
        optimizer="torch.optim.AdamW",
        optimizer_args={"weight_decay": 0.01},
        lr_scheduler="constant",
        train_unet=True,
        train_text_encoder=False,
        cache_latents=True,
        flip_aug=config.flip,
        total_batch_size=config.batch_size * config.gradient_accumulation_steps,
        seed=config.seed,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        mixed_precision=PRECISION_TO_ACCELERATE[config.precision],
        num_train_images=epoch_size,
        dataset_dirs=dataset.subsets(),
        tag_frequency=dataset.tag_frequency(),
        trigger_words=[config.trigger_word] if config.trigger_word else [],
        training_started_at=started_at.timestamp(),
        training_finished_at=finished_at.timestamp(),
        network_args={"target": config.target},
    )
    weights = LoraWeights(tensors=tensors, metadata=make_metadata(info), family=base.family)
    written = None
    if path:
        if stopped:
            root, ext = os.path.splitext(path)
            path = f"{root}_interrupted_step{step}{ext}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        written = save_lora_file(path, weights, overwrite=config.overwrite)
        emit({"type": "saved", "path": written})
    seconds = time.time() - started
    emit({"type": "done", "steps": step, "seconds": seconds, "stopped": stopped})
    return TrainResult(weights, written, losses, step, stopped, seconds, config)
