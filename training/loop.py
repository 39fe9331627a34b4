"""The training run, top to bottom: dataset -> caches -> base model -> adapters -> loop -> export.

Hosts (the ComfyUI nodes, the CLI) call ``train(config, events=..., should_stop=...)``. Events are plain
dicts: ``log`` {message}, ``cache`` {done, total}, ``start`` {total, images, samples, processes, start_step,
losses (a resumed run's losses up to start_step, kept in its state)},
``step`` {step, total, loss, lr, elapsed}, ``checkpoint`` {step, path} (a LoRA saved every N steps),
``state`` {step, path} (a resumable state), ``sample`` {step, images: [PIL], prompts, paths},
``saved`` {path} (the final LoRA), ``done`` {steps, seconds, stopped, early_stopped}. ``should_stop`` is
polled once per optimizer step and ends the run early, keeping what was learned (and, with
``save_state_on_stop``, a state to resume from with ``resume_from``).

Randomness is drawn per sample from generators seeded by (seed, sample number), not from one stream,
and the data order is a function of (seed, epoch): the same seed gives the same run whatever the batch
layout or the number of processes, and a run resumed at step N draws exactly what an uninterrupted run
would have drawn. Under ``accelerate launch`` each process takes its slice of the global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from .adapters import apply_max_norm, attach_adapters, attach_dropout, check_quantize_available, \
    optimizer_param_groups, quantize_linear_4bit
from .bnb_gate import bitsandbytes_hidden_unless, needs_bitsandbytes
from .buckets import BatchPlan, assign_bucket, epoch_order, make_bucket_resolutions  # noqa: F401 (re-export)
from .cache import LatentCache, TextCache, encode_distribution
from .config import TrainConfig
from .dataset import image_size, image_to_tensor, load_dataset, load_image, process_caption, resize_and_crop, \
    with_trigger  # noqa: F401 (re-export)
from .noise import sample_noise
from .optim import OptionalDependencyError, debiased_weights, huber_threshold, kohya_extras_metadata, \
    make_lr_scheduler, make_optimizer, min_snr_weights, per_sample_loss, training_scheduler

log = logging.getLogger("comfyui_lora_trainer")

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_MASK63 = (1 << 63) - 1
_SALT_CAPTION, _SALT_LATENT, _SALT_CROP = 101, 202, 303
_SALT_NOISE, _SALT_DROPOUT = 404, 505  # kohya's noise options (noise.py); LoRA dropout masks (adapters.py)


@dataclass
class TrainResult:
    lora: object  # formats.LoraWeights
    path: str | None
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False  # the host asked to stop (Cancel, Ctrl-C)
    seconds: float = 0.0
    config: TrainConfig | None = None
    early_stopped: bool = False  # the smoothed loss stopped improving (early_stopping_patience)
    state_path: str | None = None  # the last resumable state written, if any
    checkpoints: list = field(default_factory=list)  # LoRA files saved every N steps
    stats: dict = field(default_factory=dict)  # cache hits, VAE calls, processes, ...


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def sample_generator(seed: int, sample_number: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one training sample: its flip, timestep and noise (salt 0), caption, latent, crop."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample_number * 7_919 + 1 + salt * 65_537) & _MASK63)


def output_path(config: TrainConfig) -> str:
    return os.path.join(config.output_dir, config.output_name + ".safetensors")


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
    with torch.inference_mode(False), torch.enable_grad(), bitsandbytes_hidden_unless(needs_bitsandbytes(config)):
        try:
            return _Run(config, base, emit, stop).run()
        except OptionalDependencyError as e:
            raise TrainingError(str(e)) from None


def _rotate(folder: str, pattern: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` files matching ``<prefix>_step<N><suffix>``; returns deleted."""
    regex = re.compile(r"(\d+)\D*$")
    found = []
    for path in glob.glob(os.path.join(folder, pattern)):
        m = regex.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    found.sort()
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for path in doomed:
        try:
            os.remove(path)
        except OSError:
            pass
    return doomed


class _Run:
    def __init__(self, config: TrainConfig, base, emit, stop):
        self.config = config
        self.base = base
        self.user_emit = emit
        self.stop = stop

    # ------------------------------------------------------------------ helpers
    def emit(self, event):
        if self.is_main:
            self.user_emit(event)

    def log(self, message):
        self.emit({"type": "log", "message": message})

    # ------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        from .models import load_base_model
        from .state import check_compatible, load_state

        config = self.config
        self.started = time.time()
        self.started_at = datetime.now(timezone.utc)
        device = resolve_device(config.device)
        weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        if device.type == "cpu" and weight_dtype == torch.float16:
            raise TrainingError("precision = 'fp16' needs a GPU (fp16 loss scaling is CUDA-only); "
                                "use 'bf16' or 'fp32' on the CPU")
        if config.quantize_base == "4bit":
            check_quantize_available(device, weight_dtype)
        if config.optimizer in ("adamw8bit", "prodigy", "lion"):  # fail before loading a model
            make_optimizer(config.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-4, 0.0,
                           config.optimizer_args, device)
        self.accelerator = accelerator = make_accelerator(config, device)
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        if self.world > 1:
            device = accelerator.device
        self.device, self.weight_dtype = device, weight_dtype

        self.path = output_path(config) if config.output_dir else None
        if self.path and os.path.exists(self.path) and not config.overwrite:
            raise FileExistsError(f"{self.path} already exists; choose another output name or enable overwrite")
        self.continuation = None
        if config.network_weights:  # any key style; adapter/rank/alpha from the file (continuation.py)
            from .continuation import Continuation

            self.continuation = Continuation(config.network_weights)
            config = self.config = self.continuation.resolve(config)
        self.resume = None
        if config.resume_from:
            self.resume = load_state(config.resume_from)
            check_compatible(self.resume, self.trajectory_config())

        dataset = self.dataset = load_dataset(config.dataset, config.reg_dataset or None)
        if dataset.reg_root:
            self.log(f"regularization images: {dataset.num_reg_images} with repeats in {config.reg_dataset}, "
                     f"{dataset.num_reg_samples} per epoch beside {dataset.num_train_samples} train samples, "
                     f"loss weight {config.prior_loss_weight:g}")
        if config.batch_size * self.world > dataset.num_samples:
            from .dataset import DatasetError

            per = f" x {self.world} processes" if self.world > 1 else ""
            raise DatasetError(
                f"batch_size {config.batch_size}{per} is larger than the dataset ({dataset.num_samples} samples with "
                "repeats); lower batch_size, or add images or repeats (N_name folders)")
        for warning in dataset.warnings[:20]:
            self.log(f"warning: {warning}")
        if self.base is None:
            self.log(f"loading {config.checkpoint}")
            self.base = load_base_model(config.checkpoint, config.tokenizer, family=config.family)
        base = self.base
        self.log(f"model family {base.family}, device {device}, precision {config.precision}, "
                 f"processes {self.world}, adapter {config.adapter} ({config.target}), optimizer {config.optimizer}")
        self.scheduler = training_scheduler(base.noise_scheduler, config.zero_terminal_snr)
        if config.zero_terminal_snr and base.prediction_type != "v_prediction":
            self.log("warning: zero_terminal_snr with an epsilon-prediction model; it is meant for v-prediction")

        self.prepare_data()
        self.prepare_models()
        return self.loop()

    def trajectory_config(self) -> dict:
        values = self.config.to_dict()
        values["num_processes"] = self.world
        return values

    def prepare_data(self):
        config, base, dataset = self.config, self.base, self.dataset
        self.originals = [image_size(item.image_path) for item in dataset.items]  # (w, h)
        if config.enable_bucket:
            buckets = None if config.bucket_no_upscale else make_bucket_resolutions(
                config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
            self.sizes = [assign_bucket(w, h, buckets, config.resolution, config.bucket_reso_steps,
                                        config.bucket_no_upscale) for w, h in self.originals]
            counts: dict = {}
            for s in self.sizes:
                counts[s] = counts.get(s, 0) + 1
            self.bucket_info = {f"{w}x{h}": n for (w, h), n in sorted(counts.items())}
            self.log(f"buckets (width x height: images): {self.bucket_info}")
        else:
            self.sizes = [(config.resolution, config.resolution)] * dataset.num_images
            self.bucket_info = None
        self.random_crop = not config.center_crop
        mode = config.cache_latents
        if self.random_crop and mode != "none":
            self.log("random crop: latents cannot be cached and are encoded every step")
            mode = "none"
        self.latent_cache = None
        self.stats = {"vae_calls": 0, "latent_cache_hits": 0, "text_encoder_calls": 0}
        if mode != "none":
            cache_dir = config.cache_dir or os.path.join(dataset.root, ".lora_trainer_cache")
            cache = LatentCache(base, mode, cache_dir, config.flip, self.emit)
            cache.build(dataset.items, self.sizes, self.device)
            self.stats["vae_calls"] += cache.vae_calls
            self.stats["latent_cache_hits"] = cache.hits
            self.latent_cache = cache
            if cache.hits:
                self.log(f"latent cache: {cache.hits} of {dataset.num_images} images reused, {cache.vae_calls} encoded")
        self.captions_fixed = not (config.shuffle_caption or config.caption_dropout_rate > 0
                                   or config.caption_tag_dropout_rate > 0 or config.caption_dropout_every_n_epochs > 0
                                   or (config.enable_wildcard and dataset.has_caption_variants())
                                   or config.token_warmup_steps() > 0)
        self.text_cache = None
        if not config.train_text_encoder and config.cache_text_embeddings:
            self.text_cache = TextCache(config.max_token_length)
            if self.captions_fixed:
                for encoder in base.text_encoders:
                    encoder.to(self.device)
                for item in dataset.items:  # reg (class) images never get the trigger word
                    self.text_condition([with_trigger(item.caption, "" if item.is_reg else config.trigger_word)])
                for encoder in base.text_encoders:
                    encoder.to("cpu")

    def prepare_models(self):
        config, base, device, weight_dtype = self.config, self.base, self.device, self.weight_dtype
        unet = base.unet
        if config.quantize_base == "4bit":
            n = quantize_linear_4bit(unet, device, compute_dtype=self.weight_dtype)
            self.log(f"QLoRA: {n} UNet linear layers stored in 4 bit (NF4)")
        # One .to(device, dtype) converts tensor by tensor: the device never holds the fp32 UNet (10 GB for
        # SDXL) on the way to bf16/fp16, which .to(device) followed by .to(dtype) did.
        from .models.loader import move_module

        move_module(unet, device, weight_dtype if weight_dtype != torch.float32 else None)
        te_on_device = config.train_text_encoder or not (self.text_cache is not None and self.captions_fixed)
        for encoder in base.text_encoders:
            encoder.to(device if te_on_device else "cpu")
            if weight_dtype != torch.float32 and config.train_text_encoder:
                encoder.to(dtype=weight_dtype)
        if self.latent_cache is None:
            base.vae.to(device)
        if config.attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0
            unet.set_attn_processor(AttnProcessor2_0())
        else:
            from diffusers.models.attention_processor import AttnProcessor
            unet.set_attn_processor(AttnProcessor())
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                for encoder in base.text_encoders:
                    enable = getattr(encoder, "activation_checkpointing_enable", None) \
                        or encoder.gradient_checkpointing_enable
                    enable()
        torch.manual_seed(config.seed)
        if self.continuation is not None:
            self.continuation.prepare(base, config)
        groups = attach_adapters(base, config, adjust=self.continuation and self.continuation.adjust)
        self.unet_params = groups["unet"]
        self.te_params = [p for ps in groups["text_encoders"] for p in ps]
        for p in self.unet_params + self.te_params:
            p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
        if self.continuation is not None:
            n = self.continuation.load()
            self.log(f"continuing from {config.network_weights}: {n} {config.adapter} modules loaded "
                     f"(rank {config.rank}, alpha {config.alpha:g})"
                     + "".join(f"; {note}" for note in self.continuation.notes))
        if config.fp8_base:  # kohya's fp8_base: frozen Linear/Conv weights in float8, upcast per layer
            from .base_options import Fp8Unavailable, store_frozen_in_fp8

            try:
                n = store_frozen_in_fp8(unet) + sum(store_frozen_in_fp8(te) for te in base.text_encoders)
            except Fp8Unavailable as e:
                raise TrainingError(str(e)) from None
            self.log(f"fp8_base: {n} frozen layers stored in float8 (e4m3fn)")
        if config.torch_compile:
            from .base_options import CompileUnavailable, compile_unet

            try:
                compile_unet(unet, device)
            except CompileUnavailable as e:
                raise TrainingError(str(e)) from None
            self.log("torch_compile: the UNet is compiled on its first step (minutes on a CPU)")
        param_groups = optimizer_param_groups(base, config, self.unet_params, self.te_params)  # LoRA+ splits
        self.dropout = attach_dropout(base, config)
        optimizer = make_optimizer(config.optimizer, param_groups, config.learning_rate, config.weight_decay,
                                   config.optimizer_args, device)
        self.lr_scheduler = make_lr_scheduler(config.lr_scheduler, optimizer, config.warmup_steps(), config.steps,
                                              config.lr_scheduler_num_cycles, config.lr_scheduler_power)
        accelerator = self.accelerator
        if config.train_unet:
            self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        else:
            self.optimizer = accelerator.prepare(optimizer)
            self.unet = unet
        self.unet.train()
        self.all_params = self.unet_params + self.te_params

    # ------------------------------------------------------------------ per batch
    def text_condition(self, captions: list[str]):
        """(hidden [B,77,ctx], pooled [B,proj] or None) for captions; cached when the encoders are frozen."""
        from .models import encode_prompts

        base = self.base
        if self.config.train_text_encoder:
            self.stats["text_encoder_calls"] += 1
            with self.accelerator.autocast():
                cond = encode_prompts(base, captions, max_token_length=self.config.max_token_length)
            pooled = cond.added_cond_kwargs["text_embeds"] if cond.added_cond_kwargs else None
            return cond.encoder_hidden_states, pooled
        hidden, pooled = [None] * len(captions), [None] * len(captions)
        missing = []
        for i, caption in enumerate(captions):
            entry = self.text_cache.get(caption) if self.text_cache is not None else None
            if entry is None:
                missing.append(i)
            else:
                hidden[i], pooled[i] = entry
        if missing:
            self.stats["text_encoder_calls"] += 1
            with torch.no_grad():
                cond = encode_prompts(base, [captions[i] for i in missing],
                                      max_token_length=self.config.max_token_length)
            for j, i in enumerate(missing):
                h = cond.encoder_hidden_states[j].float().cpu()
                p = cond.added_cond_kwargs["text_embeds"][j].float().cpu() if cond.added_cond_kwargs else None
                hidden[i], pooled[i] = h, p
                if self.text_cache is not None:
                    self.text_cache.put(captions[i], h, p)
        return torch.stack(hidden), (torch.stack(pooled) if pooled[0] is not None else None)

    def make_sample(self, sample_number: int, item_index: int) -> dict:
        config = self.config
        item = self.dataset.items[item_index]
        generator = sample_generator(config.seed, sample_number)
        flip = config.flip and bool(torch.randint(0, 2, (1,), generator=generator))
        timestep = torch.randint(config.min_timestep, config.max_timestep, (1,), generator=generator)
        width, height = self.sizes[item_index]
        if self.latent_cache is not None:
            mean, std = self.latent_cache.get(item_index, flip)
            orig_h, orig_w, top, left = self.latent_cache.crop_info(item_index)
        else:
            image = load_image(item.image_path)
            orig_h, orig_w = image.height, image.width
            rng = None
            if self.random_crop:
                import numpy as np

                crop_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=sample_generator(
                    config.seed, sample_number, _SALT_CROP)))
                rng = np.random.default_rng(crop_seed)
            cropped, (top, left) = resize_and_crop(image, width, height, "random" if rng else "center", rng)
            pixels = image_to_tensor(cropped).unsqueeze(0)
            if flip:
                pixels = pixels.flip(-1)
            mean, std = encode_distribution(self.base, pixels)
            mean, std = mean[0], std[0]
            self.stats["vae_calls"] += 1
        noise, input_noise = sample_noise(
            mean.shape, generator, sample_generator(config.seed, sample_number, _SALT_NOISE),
            noise_offset=config.noise_offset, noise_offset_random_strength=config.noise_offset_random_strength,
            multires_noise_iterations=config.multires_noise_iterations,
            multires_noise_discount=config.multires_noise_discount, ip_noise_gamma=config.ip_noise_gamma,
            ip_noise_gamma_random_strength=config.ip_noise_gamma_random_strength)
        eps = torch.randn(mean.shape, generator=sample_generator(config.seed, sample_number, _SALT_LATENT))
        latent = mean + std * eps
        epoch = sample_number // self.dataset.num_samples
        caption = process_caption(
            item.caption, trigger="" if item.is_reg else config.trigger_word, shuffle=config.shuffle_caption,
            keep_tokens=config.keep_tokens, wildcard=config.enable_wildcard, lines=item.caption_lines,
            step=getattr(self, "current_step", 0), token_warmup_min=config.token_warmup_min,
            token_warmup_step=config.token_warmup_steps(),
            separator=config.caption_separator, dropout_rate=config.caption_dropout_rate,
            tag_dropout_rate=config.caption_tag_dropout_rate,
            drop_all=config.caption_dropout_every_n_epochs > 0 and (epoch + 1) % config.caption_dropout_every_n_epochs == 0,
            generator=sample_generator(config.seed, sample_number, _SALT_CAPTION),
        )
        return {"latent": latent, "noise": noise, "input_noise": input_noise, "timestep": timestep, "caption": caption,
                "time_ids": (orig_h, orig_w, top, left, height, width)}

    def micro_step_loss(self, micro_index: int):
        """This process's loss for global micro-batch ``micro_index`` (scaled so DDP's mean is the global mean)."""
        config, base = self.config, self.base
        batch = self.plan.micro_batch(micro_index)
        n_global = len(batch)
        local = batch[self.rank * config.batch_size:(self.rank + 1) * config.batch_size]
        self.current_step = micro_index // config.gradient_accumulation_steps  # 0-based optimizer step
        weights = [config.prior_loss_weight if self.dataset.items[i].is_reg else 1.0 for _, i in local]
        if not local:  # a short bucket batch left this process nothing: keep DDP in step, weight 0
            local, weights = batch[:1], [0.0]
        samples = [self.make_sample(n, i) for n, i in local]
        if self.dropout is not None:  # per-sample LoRA dropout masks (also for checkpointing's recomputation)
            self.dropout.set_seeds([int(torch.randint(0, 2**62, (1,), generator=sample_generator(
                config.seed, n, _SALT_DROPOUT))) for n, _ in local])
        device, wd = self.device, self.weight_dtype
        latents = torch.stack([s["latent"] for s in samples]).to(device)
        noise = torch.stack([s["noise"] for s in samples]).to(device)
        timesteps = torch.cat([s["timestep"] for s in samples]).to(device)
        hidden, pooled = self.text_condition([s["caption"] for s in samples])
        added = None
        if base.family == "sdxl":
            time_ids = torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32)
            added = {"text_embeds": pooled.to(device, wd), "time_ids": time_ids.to(device, wd)}
        scheduler = self.scheduler
        input_noise = torch.stack([s["input_noise"] for s in samples]).to(device)  # ip_noise_gamma perturbs it
        noisy = scheduler.add_noise(latents, input_noise, timesteps).to(wd)
        if base.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, hidden.to(device, wd), added_cond_kwargs=added).sample
        huber_c = config.huber_c if config.loss_type not in ("huber", "smooth_l1") else huber_threshold(
            config.huber_schedule, config.huber_c, config.huber_scale, scheduler, timesteps)
        per = per_sample_loss(prediction, target, config.loss_type, huber_c)
        if config.min_snr_gamma > 0:
            per = per * min_snr_weights(scheduler, timesteps, config.min_snr_gamma, base.prediction_type)
        if config.debiased_estimation_loss:
            per = per * debiased_weights(scheduler, timesteps, base.prediction_type)
        w = torch.tensor(weights, device=per.device)
        return (per * w).sum() * self.world / n_global

    # ------------------------------------------------------------------ saving
    def export(self):
        from .formats import kohya_state_dict_from_models

        config = self.config
        unet = self.accelerator.unwrap_model(self.unet) if config.train_unet else None
        tes = list(self.base.text_encoders) if config.train_text_encoder else []
        try:
            tensors = kohya_state_dict_from_models(self.base.family, unet=unet, text_encoders=tes)
            if self.continuation is not None:  # the file's diff/diff_b changes, kept as they were
                tensors.update({k: v.clone() for k, v in self.continuation.passthrough.items()})
            return tensors
        except NotImplementedError as e:
            raise TrainingError(f"adapter = {config.adapter!r}: the trained weights cannot be written yet ({e})") \
                from None

    def lora_weights(self, step: int):
        from .formats import LoraWeights, RunInfo, make_metadata

        config, dataset = self.config, self.dataset
        tensors = self.export()
        network_args = {"target": config.target, "adapter": config.adapter}
        if config.target == "custom":
            network_args["target_modules"] = config.target_modules
        if config.conv_rank:
            network_args.update(conv_dim=config.conv_rank, conv_alpha=config.conv_alpha or config.conv_rank)
        if config.rslora:
            network_args["rslora"] = True
        extra_args, extra_fields = kohya_extras_metadata(config)
        network_args.update(extra_args)
        info = RunInfo(
            family=self.base.family,
            output_name=config.output_name,
            network_dim=config.rank,
            network_alpha=config.alpha,
            base_model_name=os.path.basename(config.checkpoint or self.base.source or ""),
            resolution=config.resolution,
            steps=step,
            max_train_steps=config.steps,
            epoch=(step * self.global_batch * config.gradient_accumulation_steps + dataset.num_samples - 1)
            // dataset.num_samples,
            learning_rate=config.learning_rate,
            unet_lr=config.learning_rate if config.train_unet else None,
            text_encoder_lr=config.effective_text_encoder_lr if config.train_text_encoder else None,
            optimizer=type(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer)
            .__module__ + "." + type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__,
            optimizer_args={"weight_decay": config.weight_decay, **config.optimizer_args},
            lr_scheduler=config.lr_scheduler,
            lr_warmup_steps=config.warmup_steps(),
            train_unet=config.train_unet,
            train_text_encoder=config.train_text_encoder,
            cache_latents=self.latent_cache is not None,
            flip_aug=config.flip,
            enable_bucket=config.enable_bucket,
            min_bucket_reso=config.min_bucket_reso if config.enable_bucket else None,
            max_bucket_reso=config.max_bucket_reso if config.enable_bucket else None,
            bucket_info={"buckets": self.bucket_info} if self.bucket_info else None,
            shuffle_caption=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            caption_dropout_rate=config.caption_dropout_rate,
            total_batch_size=self.global_batch * config.gradient_accumulation_steps,
            seed=config.seed,
            batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_grad_norm=config.max_grad_norm,
            gradient_checkpointing=config.gradient_checkpointing,
            mixed_precision=PRECISION_TO_ACCELERATE[config.precision],
            noise_offset=config.noise_offset or None,
            min_snr_gamma=config.min_snr_gamma or None,
            loss_type=config.loss_type,
            zero_terminal_snr=config.zero_terminal_snr,
            num_train_images=dataset.num_train_samples,
            num_reg_images=dataset.num_reg_images,
            reg_dataset_dirs=dataset.reg_dirs if dataset.reg_root else None,
            prior_loss_weight=config.prior_loss_weight,
            dataset_dirs=dataset.subsets(),
            tag_frequency=dataset.tag_frequency(),
            trigger_words=[config.trigger_word] if config.trigger_word else [],
            training_started_at=self.started_at.timestamp(),
            training_finished_at=datetime.now(timezone.utc).timestamp(),
            network_args=network_args,
        )
        info.extra.update(extra_fields)  # ss_multires_noise_iterations, ss_huber_schedule, ... (kohya's names)
        return LoraWeights(tensors=tensors, metadata=make_metadata(info), family=self.base.family)

    def save_state(self, step: int) -> str | None:
        from .state import save_state, state_path

        folder = self.config.state_dir or self.config.output_dir
        if not folder:
            return None
        path = state_path(folder, self.config.output_name, step)
        if self.is_main:
            save_state(path, step=step, models=self.trainable_models(), optimizer=self.optimizer,
                       lr_scheduler=self.lr_scheduler, extra=self.extra_state(), config=self.trajectory_config())
            self.emit({"type": "state", "step": step, "path": path})
        return path

    def trainable_models(self) -> dict:
        models = {}
        if self.config.train_unet:
            models["unet"] = self.accelerator.unwrap_model(self.unet)
        if self.config.train_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                models[f"te{i + 1}"] = te
        return models

    def extra_state(self) -> dict:
        return {"losses": list(self.losses), "ema": self.ema, "best": self.best, "since_best": self.since_best}

    def save_checkpoint(self, step: int) -> str | None:
        from .formats import save_lora_file

        config = self.config
        if not config.output_dir:
            return None
        path = os.path.join(config.output_dir, f"{config.output_name}_step{step}.safetensors")
        if self.is_main:
            os.makedirs(config.output_dir, exist_ok=True)
            save_lora_file(path, self.lora_weights(step), overwrite=True)
            self.emit({"type": "checkpoint", "step": step, "path": path})
        return path

    def rotate(self):
        config = self.config
        if self.is_main and config.keep_last_n > 0 and config.output_dir:
            name = glob.escape(config.output_name)
            _rotate(config.output_dir, f"{name}_step*.safetensors", config.keep_last_n)
            _rotate(config.state_dir or config.output_dir, f"{name}_state_step*.pt", config.keep_last_n)

    def sample(self, step: int):
        from .sampling import parse_prompt, sample_images

        config = self.config
        if not config.sample_prompts or not self.is_main:
            return
        unet = self.accelerator.unwrap_model(self.unet)
        images = sample_images(
            self.base, unet, list(self.base.text_encoders), list(config.sample_prompts),
            negative_prompt=config.sample_negative_prompt, seed=config.sample_seed, steps=config.sample_steps,
            cfg=config.sample_cfg, sampler=config.sample_sampler,
            size=config.sample_resolution or config.resolution, device=self.device, autocast=self.accelerator.autocast,
            max_token_length=config.max_token_length,
        )
        paths = []
        if config.output_dir:
            folder = os.path.join(config.output_dir, f"{config.output_name}_samples")
            os.makedirs(folder, exist_ok=True)
            for i, image in enumerate(images):
                paths.append(os.path.join(folder, f"step{step:06d}_{i:02d}.png"))
                image.save(paths[-1])
        self.emit({"type": "sample", "step": step, "images": images,
                   "prompts": [parse_prompt(p).prompt for p in config.sample_prompts],
                   "paths": paths})

    # ------------------------------------------------------------------ the loop
    def loop(self) -> TrainResult:
        from .state import restore_params

        config, accelerator = self.config, self.accelerator
        self.global_batch = config.batch_size * self.world
        item_bucket = self.sizes if config.enable_bucket else None
        self.plan = BatchPlan(self.dataset.epoch_indices(), item_bucket, self.global_batch, config.seed)
        self.losses: list[float] = []
        self.ema, self.best, self.since_best = None, math.inf, 0
        start_step = 0
        if self.resume is not None:
            state = self.resume
            restore_params(state, self.trainable_models())
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            extra = state.get("extra", {})
            self.losses = list(extra.get("losses", []))
            self.ema, self.best, self.since_best = extra.get("ema"), extra.get("best", math.inf), \
                extra.get("since_best", 0)
            start_step = int(state["step"])
            self.log(f"resumed from {state['path']} at step {start_step}")
        self.emit({"type": "start", "total": config.steps, "images": self.dataset.num_images,
                   "samples": self.dataset.num_samples, "processes": self.world, "device": str(self.device),
                   "precision": config.precision, "start_step": start_step,
                   "losses": list(self.losses)})  # a resumed run's earlier losses, from its state
        if config.sample_every_n_steps and start_step == 0:
            self.sample(0)
        stopped = early = False
        state_path = None
        checkpoints = []
        step = start_step
        models = [self.unet] if config.train_unet else list(self.base.text_encoders)
        for step in range(start_step + 1, config.steps + 1):
            step_loss = 0.0
            for j in range(config.gradient_accumulation_steps):
                with accelerator.accumulate(*models):
                    loss = self.micro_step_loss((step - 1) * config.gradient_accumulation_steps + j)
                    global_loss = accelerator.reduce(loss.detach().float(), "mean") if self.world > 1 else loss.detach()
                    value = float(global_loss)
                    if not math.isfinite(value):
                        last = state_path or (checkpoints[-1] if checkpoints else None)
                        raise TrainingError(
                            f"the loss became {value} at step {step}; stopped without saving it. "
                            + (f"The last good save is {last}. " if last else "")
                            + "Lower learning_rate, or use fp32/bf16 instead of fp16."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if self.world > 1 and self.te_params:
                            for p in self.te_params:
                                if p.grad is not None:
                                    torch.distributed.all_reduce(p.grad)
                                    p.grad /= self.world
                        if config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(self.all_params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += value / config.gradient_accumulation_steps
            self.lr_scheduler.step()
            if config.scale_weight_norms > 0:  # kohya's max-norm regularisation, after every optimizer step
                scaled, _, _ = apply_max_norm(self.trainable_models().values(), config.scale_weight_norms)
                self.stats["max_norm_scaled"] = self.stats.get("max_norm_scaled", 0) + scaled
            self.losses.append(step_loss)
            self.emit({"type": "step", "step": step, "total": config.steps, "loss": step_loss,
                       "lr": self.optimizer.param_groups[0]["lr"], "elapsed": time.time() - self.started})
            if config.early_stopping_patience:
                beta = config.early_stopping_smoothing
                self.ema = step_loss if self.ema is None else beta * self.ema + (1 - beta) * step_loss
                if self.ema < self.best - config.early_stopping_min_delta:
                    self.best, self.since_best = self.ema, 0
                else:
                    self.since_best += 1
                    if self.since_best >= config.early_stopping_patience:
                        early = True
                        self.log(f"early stopping at step {step}: the smoothed loss has not improved for "
                                 f"{self.since_best} steps (best {self.best:.5f})")
            if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
                self.sample(step)
            if early:
                break
            if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < config.steps:
                checkpoints.append(self.save_checkpoint(step))
                if config.save_state:
                    state_path = self.save_state(step)
                self.rotate()
            if self.stop():
                stopped = True
                break

        accelerator.wait_for_everyone()
        self.unet.eval()
        if self.dropout is not None:  # the model goes back to the host without the dropout hooks
            self.dropout.remove()
        weights = self.lora_weights(step)
        written = None
        if self.path:
            path = self.path
            if stopped:
                root, ext = os.path.splitext(path)
                path = f"{root}_interrupted_step{step}{ext}"
            if (stopped and config.save_state_on_stop) or (config.save_state and not stopped):
                state_path = self.save_state(step)
            if self.is_main:
                from .formats import save_lora_file

                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                written = save_lora_file(path, weights, overwrite=config.overwrite)
                self.emit({"type": "saved", "path": written})
            else:
                written = path
        accelerator.wait_for_everyone()
        seconds = time.time() - self.started
        self.stats["processes"] = self.world
        self.emit({"type": "done", "steps": step, "seconds": seconds, "stopped": stopped, "early_stopped": early})
        return TrainResult(weights, written, self.losses, step, stopped, seconds, config, early_stopped=early,
                           state_path=state_path, checkpoints=[c for c in checkpoints if c], stats=dict(self.stats))
