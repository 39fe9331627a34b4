"""The base model ComfyUI already holds (the graph's MODEL, CLIP and VAE) as what the training loop needs
(design.md, "Two sources of a base model"): the modules to put adapters on, the parameterisation, a forward
pass in the model's own parameterisation, text conditionings and latents. The weights are trained in place:
nothing here copies the model.

Everything model-specific comes from ComfyUI's own code: ``model_sampling`` (parameterisation, sigma <->
timestep, input scaling), ``BaseModel.extra_conds`` (Flux guidance, pooled ``y``, SDXL size conditioning,
Lumina2's caption length), ``BaseModel.apply_model`` (the call the sampler makes), ``CLIP.tokenize`` /
``encode_from_tokens_scheduled`` and ``VAE.encode`` + ``process_latent_in``. ComfyUI is imported only in
functions, as in nodes/host.py, so the module imports without it.

A family is refused unless it is in :data:`TESTED` (tiny models of it pass tests/integration/
test_comfy_model_families.py in a real ComfyUI), with the list of the tested ones.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from ..training.formats.families import MODEL_FAMILIES
from ..training.formats.names import comfy_unet_name
from .spec import NodeError

PRESETS = ("attention", "attention_ff", "full")


@dataclass(frozen=True)
class Family:
    """One model family as ComfyUI loads it. Patterns are matched (``re.search``) against module paths of
    ``model.diffusion_model``; only ``torch.nn.Linear`` modules are targets. ``full`` = attention + MLP +
    modulation: every Linear of the transformer blocks, kohya's default for its DiT networks
    (networks/lora_flux.py, lora_sd3.py, lora_lumina.py)."""

    id: str
    label: str
    attention: str
    ff: str
    modulation: str = ""
    default_preset: str = "full"
    # the guidance input set while training (kohya --guidance_scale; 1.0 "disables" Flux-dev's distilled
    # guidance, Chroma needs 0); None: the model has no guidance input
    guidance: float | None = None

    def pattern(self, preset: str) -> re.Pattern:
        if preset not in PRESETS:
            raise NodeError(f"target preset {preset!r}: use one of {', '.join(PRESETS)}")
        parts = [self.attention] + ([self.ff] if preset != "attention" else [])
        if preset == "full" and self.modulation:
            parts.append(self.modulation)
        return re.compile("|".join(f"(?:{p})" for p in parts))


_FLUX_ATTN = r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$|^single_blocks\.\d+\.linear[12]$"
_FLUX_FF = r"^double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$"
_FLUX_MOD = r"^double_blocks\.\d+\.(img|txt)_mod\.lin$|^single_blocks\.\d+\.modulation\.lin$"
_SD3_BLOCK = r"^joint_blocks\.\d+\.(context_block|x_block)\."
_LUMINA_BLOCK = r"^(layers|noise_refiner|context_refiner)\.\d+\."
_QWEN_BLOCK = r"^transformer_blocks\.\d+\."
_UNET_BLOCK = r"\.transformer_blocks\.\d+\."

_UNET_ATTN = _UNET_BLOCK + r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_UNET_FF = _UNET_BLOCK + r"ff\.net\.(0\.proj|2)$|\.\d+\.1\.(proj_in|proj_out)$"

FAMILIES: dict[str, Family] = {f.id: f for f in (
    *(Family(fid, label, _UNET_ATTN, _UNET_FF, default_preset="attention_ff")
      for fid, label in (("sd1", "SD1.x"), ("sd2", "SD2.x"), ("sd2-v", "SD2.x (v)"), ("sdxl", "SDXL"))),
    Family("sd3", "SD3 (MMDiT)", _SD3_BLOCK + r"attn2?\.(qkv|proj)$", _SD3_BLOCK + r"mlp\.(fc1|fc2)$",
           _SD3_BLOCK + r"adaLN_modulation\.1$"),
    Family("sd3.5-medium", "SD3.5 Medium (MMDiT-X)", _SD3_BLOCK + r"attn2?\.(qkv|proj)$",
           _SD3_BLOCK + r"mlp\.(fc1|fc2)$", _SD3_BLOCK + r"adaLN_modulation\.1$"),
    Family("sd3.5-large", "SD3.5 Large", _SD3_BLOCK + r"attn2?\.(qkv|proj)$", _SD3_BLOCK + r"mlp\.(fc1|fc2)$",
           _SD3_BLOCK + r"adaLN_modulation\.1$"),
    Family("flux-dev", "Flux.1 dev", _FLUX_ATTN, _FLUX_FF, _FLUX_MOD, guidance=1.0),
    Family("flux-schnell", "Flux.1 schnell", _FLUX_ATTN, _FLUX_FF, _FLUX_MOD),
    Family("chroma", "Chroma", _FLUX_ATTN, _FLUX_FF, guidance=0.0),
    Family("lumina2", "Lumina Image 2.0", _LUMINA_BLOCK + r"attention\.(qkv|out)$",
           _LUMINA_BLOCK + r"feed_forward\.(w1|w2|w3)$", _LUMINA_BLOCK + r"adaLN_modulation\.1$"),
    # Z-Image's blocks modulate through adaLN_modulation.0 (ComfyUI's z_image_modulation), Lumina2's through .1
    Family("z-image", "Z-Image", _LUMINA_BLOCK + r"attention\.(qkv|out)$",
           _LUMINA_BLOCK + r"feed_forward\.(w1|w2|w3)$", _LUMINA_BLOCK + r"adaLN_modulation\.0$"),
    Family("qwen-image", "Qwen-Image",
           _QWEN_BLOCK + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
           _QWEN_BLOCK + r"(img|txt)_mlp\.net\.(0\.proj|2)$", _QWEN_BLOCK + r"(img|txt)_mod\.1$"),
)}

# the transformer families (training/dit_blocks.py knows their blocks); the others are UNets
DIT_FAMILIES = MODEL_FAMILIES

# families whose tiny models pass tests/integration/test_comfy_model_families.py (load, targets, forward, a
# training step that lowers the loss, a written file ComfyUI loads with every key and the same outputs)
TESTED = ("sd1", "sd2", "sd2-v", "sdxl", "flux-dev", "flux-schnell", "sd3", "sd3.5-medium", "chroma", "lumina2",
          "z-image", "qwen-image")

# ComfyUI's model config class (comfy/supported_models.py) -> family; SD3's variants by their MMDiT shape
_CONFIG_FAMILY = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": None, "SDXL": "sdxl", "SD3": "sd3",
                  "Flux": "flux-dev", "FluxSchnell": "flux-schnell", "Chroma": "chroma", "Lumina2": "lumina2",
                  "ZImage": "z-image", "QwenImage": "qwen-image"}

# the CLIP outputs a family's model reads (CONDITIONING extras); the rest (hooks, areas, masks) is the graph's
TEXT_EXTRAS = ("pooled_output", "attention_mask", "conditioning_llama3")


def family_of(model) -> tuple[str | None, str]:
    """(our family id or None, ComfyUI's model config class name) of a MODEL (ModelPatcher)."""
    config = model.model.model_config
    name = type(config).__name__
    family = _CONFIG_FAMILY.get(name)
    if family == "sd3":
        unet = config.unet_config
        if unet.get("x_block_self_attn_layers"):
            family = "sd3.5-medium"
        elif int(unet.get("depth", 0)) >= 38:
            family = "sd3.5-large"
    if family == "sd2" and parameterisation_of(model.get_model_object("model_sampling")) == "v":
        family = "sd2-v"
    return family, name


def tested_families_text() -> str:
    return ", ".join(FAMILIES[f].label for f in TESTED)


def check_tested(model) -> str:
    """The family id of ``model``, or a NodeError naming it and the tested families."""
    family, config_name = family_of(model)
    if family not in TESTED:
        what = FAMILIES[family].label if family in FAMILIES else f"a {config_name} model"
        raise NodeError(
            f"training on {what} is not tested yet, so it is refused rather than trained possibly wrong; "
            f"tested on ComfyUI's models: {tested_families_text()}")
    return family


def parameterisation_of(model_sampling) -> str:
    """"eps", "v" or "flow" from ComfyUI's model sampling object (the class that defines
    ``calculate_denoised``: EPS, V_PREDICTION, CONST); a NodeError for the others (X0, EDM, ...)."""
    import comfy.model_sampling as ms

    known = {ms.EPS: "eps", ms.V_PREDICTION: "v", ms.CONST: "flow"}
    for cls in type(model_sampling).__mro__:
        if "calculate_denoised" in vars(cls):
            if cls in known:
                return known[cls]
            raise NodeError(f"the model predicts {cls.__name__} (comfy.model_sampling); training supports "
                            "epsilon, v and flow (CONST) models")
    raise NodeError(f"{type(model_sampling).__name__} is no ComfyUI model sampling object")


def _pack_saved(t: torch.Tensor):
    # weights (leaves, or views of them) are never written in place: keep them; activations are copied
    if t.is_leaf or (t._base is not None and t._base.is_leaf):
        return t
    return t.clone()


def _keep_saved_activations():
    """ComfyUI's DiT blocks add into their activations in place (Flux's ``x += apply_mod(...)``), after
    LayerNorm and the adapters saved them for backward; autograd would refuse the backward pass. Saving a copy
    of each activation keeps it correct at the cost of that copy (block-wise gradient checkpointing, which
    recomputes instead, is the loop's memory option). A no-op without grad."""
    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved, lambda t: t)


@dataclass
class TextConditioning:
    """One prompt's CLIP output as ComfyUI's CONDITIONING holds it: ``cond`` [1, tokens, width] and the
    extras the family's model reads (:data:`TEXT_EXTRAS`). Tensors live on the CPU until a forward pass."""

    cond: torch.Tensor
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_comfy(cls, conditioning) -> "TextConditioning":
        """From a CONDITIONING value (``[[cond, {extras}]]``) with one entry: a scheduled or combined
        conditioning has no single training target."""
        if not isinstance(conditioning, (list, tuple)) or len(conditioning) != 1:
            raise NodeError("a training caption must encode to one conditioning entry; got "
                            f"{len(conditioning) if isinstance(conditioning, (list, tuple)) else 'no'} "
                            "(scheduled CLIP hooks or combined conditionings are not supported)")
        cond, extras = conditioning[0]
        with torch.inference_mode(False):
            # None values stay: some extra_conds read the key itself (0.3.64's Flux/Chroma: kwargs["pooled_output"])
            keep = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in extras.items()
                    if k in TEXT_EXTRAS}
            return cls(cond.detach().cpu().clone(), keep)


# our parameterisation names (ComfyUI's model sampling) -> the loop's (loss.PARAMETERISATIONS)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "flow": "flow"}
# our sample samplers (TrainConfig.sample_sampler) -> ComfyUI's KSampler names
COMFY_SAMPLERS = {"euler": "euler", "euler_a": "euler_ancestral", "ddim": "ddim", "dpm++": "dpmpp_2m"}
# SDXL's size conditioning as ComfyUI's SDXL.encode_adm (and CLIPTextEncodeSDXL) names it, in the loop's
# time-ids order: original height, width, crop top, left, target height, width
SDXL_SIZE_KEYS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
# the distilled guidance Flux.1 dev samples with (ComfyUI's FluxGuidance default)
SAMPLE_GUIDANCE = {"flux-dev": 3.5}


class ComfyBaseModel:
    """The loop's view of a MODEL (+ CLIP, VAE) from the graph: a ``training.models.hosted.HostedModel``.
    See the module doc; the methods:

    - ``family``, ``label``, ``parameterisation`` ("eps" | "v" | "flow"), ``diffusion_model`` (the module
      the adapters go on, ComfyUI's own, trained in place);
    - :meth:`prepare` (load onto the compute device the way ComfyUI does, with the graph's patches, and make
      the weights usable by autograd), :meth:`adapter_targets`, :meth:`lora_name`;
    - :meth:`encode_text`, :meth:`encode_images`, :meth:`noisy_input`, :meth:`forward`.
    """

    def __init__(self, model, clip=None, vae=None, family: str | None = None, guidance: float | None = None):
        if model is None or not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
            raise NodeError("MODEL input: connect a model from Load Checkpoint or Load Diffusion Model")
        detected = check_tested(model)
        if family is not None and family != detected:
            raise NodeError(f"family = {family!r}, but the MODEL input is {FAMILIES[detected].label}")
        self.patcher = model
        self.clip = clip
        self.vae = vae
        self.family = detected
        self.spec = FAMILIES[detected]
        self.label = self.spec.label
        self.guidance = self.spec.guidance if guidance is None else float(guidance)
        self.parameterisation = parameterisation_of(self.model_sampling)
        self._checked_output = False
        self._scheduler = None
        self._undo = contextlib.ExitStack()  # what release() takes off the model (block swap, checkpointing, ...)
        # HostedModel: the text encoders stay frozen (captions are encoded once), the file names the model
        self.text_encoders: list = []
        self.source = f"ComfyUI MODEL ({self.label})"

    # -- the model ------------------------------------------------------------------------------------
    @property
    def base(self):
        """ComfyUI's BaseModel (``model.model``)."""
        return self.patcher.model

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def model_sampling(self):
        return self.patcher.get_model_object("model_sampling")

    @property
    def latent_channels(self) -> int:
        return int(self.base.latent_format.latent_channels)

    @property
    def latent_dimensions(self) -> int:
        """2: latents are [B, C, H, W]; 3: [B, C, T, H, W] (Qwen-Image's video-VAE latents, T = 1 for images)."""
        return int(getattr(self.base.latent_format, "latent_dimensions", 2))

    def prepare(self) -> torch.device:
        """Load the model onto ComfyUI's compute device in full, with the patches the graph put on it (LoRAs
        applied upstream are part of the weights being trained), and turn inference-mode weights (what
        ComfyUI's loaders make inside its inference mode) into ordinary tensors autograd can save, one tensor
        at a time: no second copy of the model. Returns the device."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], force_full_load=True)
        with torch.inference_mode(False), torch.no_grad():
            for module in self.diffusion_model.modules():
                for store in (module._parameters, module._buffers):
                    for name, t in list(store.items()):
                        if t is not None and t.is_inference():
                            fresh = t.clone()
                            store[name] = torch.nn.Parameter(fresh, requires_grad=False) \
                                if isinstance(t, torch.nn.Parameter) else fresh
        return torch.device(self.patcher.load_device)

    @contextlib.contextmanager
    def training(self):
        """Hold ComfyUI's ``model_management.in_training`` (0.33 has it; older versions have no such flag)
        while training: its models then take the autograd-capable paths (Flux rope in torch instead of
        comfy_kitchen's kernel, Lumina2's unfused q/k norm, no INT8 fused activations). Wrap whole steps in it
        (a checkpointed forward re-runs inside backward); :meth:`forward` also sets it for its own call."""
        import comfy.model_management as mm

        had = hasattr(mm, "in_training")
        before = getattr(mm, "in_training", False)
        mm.in_training = True
        try:
            yield self
        finally:
            if had:
                mm.in_training = before
            else:
                del mm.in_training

    def adapter_targets(self, preset: str | None = None) -> dict[str, torch.nn.Linear]:
        """Module path (in ``diffusion_model``) -> Linear module, for ``preset`` (attention, attention_ff,
        full; None: the family's default), in the model's order."""
        pattern = self.spec.pattern(preset or self.spec.default_preset)
        out = {name: m for name, m in self.diffusion_model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.search(name)}
        if not out:
            raise NodeError(f"no Linear module of this {self.label} model matches the {preset} targets")
        return out

    def lora_name(self, module_path: str) -> str:
        """The kohya name a file stores the adapter of ``module_path`` under (formats/names.py)."""
        return comfy_unet_name(self.family, module_path, self._unet_structure())

    def _unet_structure(self):
        if self.family not in ("sd1", "sd2", "sd2-v"):
            return None
        config = self.base.model_config.unet_config
        layers = config.get("num_res_blocks", [2])
        layers = layers[0] if isinstance(layers, (list, tuple)) else layers
        # ComfyUI's UNetModel pops transformer_depth_output from the end as it builds output_blocks 0, 1, ...
        # (the deepest level first, as diffusers' up_blocks): read it reversed
        depth = list(reversed(config.get("transformer_depth_output") or []))
        levels = len(config.get("channel_mult", ()))
        per_level = int(layers) + 1
        up_attn = [any(depth[i * per_level:(i + 1) * per_level]) for i in range(levels)] if depth else None
        return (int(layers), up_attn) if up_attn is not None else None

    # -- the training loop's protocol (training/models/hosted.py) -------------------------------------
    @property
    def prediction_type(self) -> str:
        return PREDICTION_TYPES[self.parameterisation]

    @property
    def unet(self) -> torch.nn.Module:
        return self.diffusion_model

    @property
    def noise_scheduler(self):
        """eps/v models: a DDPM schedule with ComfyUI's own alphas_cumprod (``1 / (1 + sigma^2)``), so the loop
        noises as the model was trained; None for flow models (loss.Objective draws sigma itself)."""
        if self.parameterisation == "flow":
            return None
        if self._scheduler is None:
            from diffusers import DDPMScheduler

            sigmas = self.model_sampling.sigmas.detach().double().cpu()
            alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
            previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            betas = (1.0 - alphas_cumprod / previous).float()
            self._scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                                            prediction_type=self.prediction_type)
        return self._scheduler

    def place(self, device, dtype, gradient_checkpointing: bool, keep_text_encoders: bool = False) -> None:
        """The diffusion model on ComfyUI's device for training; ComfyUI's other models (the text encoders and
        the VAE, which did their work while the caches were built) leave it first. ``keep_text_encoders``:
        captions are encoded every step (caption augmentation), so the CLIP is loaded beside the model once,
        rather than making ComfyUI swap models at every step."""
        import comfy.model_management as mm

        from ..training.dit_blocks import checkpoint_blocks

        mm.unload_all_models()
        if keep_text_encoders and self.clip is not None:
            mm.load_models_gpu([self.clip.patcher], force_full_load=True)
        loaded = self.prepare()
        if torch.device(device).type != loaded.type:
            raise NodeError(f"the run trains on {device}, but ComfyUI loads this model on {loaded}")
        # ComfyUI's training flag for the whole run, not just each forward call: a checkpointed block recomputes
        # its forward inside backward and must take the same (autograd-capable) path as the first time
        self._undo.enter_context(self.training())
        if gradient_checkpointing:  # per block: each recomputes its forward in the backward pass
            self._undo.callback(checkpoint_blocks(self._blocks()).remove)

    def text_encoder_bytes(self) -> int | None:
        return int(self.clip.patcher.model_size()) if self.clip is not None else None

    def swap_blocks(self, blocks_to_swap: int, device) -> None:
        from ..training.block_swap import BlockSwap, swap_selection
        from ..training.dit_blocks import block_lists

        if self.family not in DIT_FAMILIES:
            raise NodeError(f"blocks_to_swap: block swap moves the transformer blocks of the DiT families; "
                            f"{self.label} trains without it (blocks_to_swap = 0)")
        lists = [(name, len(blocks)) for name, blocks in block_lists(self.diffusion_model, self.family)]
        try:
            selection = swap_selection(lists, int(blocks_to_swap))
        except ValueError as e:
            raise NodeError(str(e)) from None
        self._undo.callback(BlockSwap(self._blocks(), selection, device).attach().detach)

    def _blocks(self) -> list:
        """The blocks checkpointing and block swap wrap, in the order the forward pass runs them: a DiT's
        transformer blocks; a UNet's input blocks, middle block and output blocks."""
        from ..training.dit_blocks import flat_blocks

        net = self.diffusion_model
        if self.family in DIT_FAMILIES:
            return flat_blocks(net, self.family)
        return [*net.input_blocks, net.middle_block, *net.output_blocks]

    def memory_shape(self):
        """What nodes/estimate.py needs of this model: its transformer blocks' shapes and the bytes its frozen
        weights are held in (DiT families), or the UNet's shapes (SD families; the text encoders and the VAE
        leave the device before the first step)."""
        from .estimate import UNET_PREFIX, dit_shape_from_model, model_shape_from_shapes

        if self.family in DIT_FAMILIES:
            return dit_shape_from_model(self.diffusion_model, self.family)
        shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in self.diffusion_model.state_dict().items()}
        return model_shape_from_shapes(shapes, self.family)

    def adapter_pattern(self, target: str) -> str:
        # peft full-matches a string pattern against the module path; the family's patterns are searched
        return f".*(?:{self.spec.pattern(target).pattern})"

    def latent_fingerprint(self) -> str:
        from ..training.cache import model_fingerprint

        self._require_vae()
        return f"{self.family}:{model_fingerprint(self.vae.first_stage_model)}"

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, zeros): ComfyUI's VAE encodes to the distribution's mode, so there is no spread to sample."""
        images = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()
        latents = self.encode_images(images).float()
        return latents, torch.zeros_like(latents)

    def encode_captions(self, captions: list[str]) -> list:
        return self.encode_text(captions)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditionings: list,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The loop's noisy latent -> the model's output. Flow models: ``timesteps`` are the noise levels and the
        input is already ComfyUI's. eps/v models: DDPM timesteps, and the DDPM input ``x_t`` becomes ComfyUI's
        ``x0 + sigma * noise`` (``x_t * sqrt(1 + sigma^2)``), which apply_model scales back."""
        if self.parameterisation == "flow":
            return self.forward(noisy, timesteps.float(), conditionings, sizes)
        sigma = self.sigmas_of_timesteps(timesteps.cpu()).to(noisy.device, torch.float32)
        scale = torch.sqrt(1.0 + sigma ** 2).view(-1, *([1] * (noisy.dim() - 1)))
        return self.forward((noisy.float() * scale).to(noisy.dtype), sigma, conditionings, sizes)

    def adapter_tensors(self) -> dict:
        from ..training.formats.export import export_diffusion_model

        return export_diffusion_model(self.family, self.diffusion_model, structure=self._unet_structure()).tensors

    def sample(self, prompts: list[str], negative_prompt: str, seed: int, steps: int, cfg: float, sampler: str,
               width: int, height: int) -> list:
        """Images of ``prompts`` from ComfyUI's own sampler on the model as trained so far (the adapters are in
        it), as a KSampler with an empty latent would make them, then the VAE's decode."""
        import comfy.sample
        from PIL import Image

        from ..training.validation import eval_mode

        self._require_vae()
        guidance = SAMPLE_GUIDANCE.get(self.family)
        negative = self._conditioning(negative_prompt or "")
        images = []
        with torch.no_grad(), eval_mode(self.diffusion_model):
            for prompt in prompts:
                positive = self._conditioning(prompt)
                if guidance is not None:  # as FluxGuidance sets it on the conditioning
                    positive = [[c, {**extras, "guidance": guidance}] for c, extras in positive]
                shape = [1, self.latent_channels] + ([1] if self.latent_dimensions == 3 else []) \
                    + [max(height // 8, 1), max(width // 8, 1)]
                latent = torch.zeros(shape)
                noise = comfy.sample.prepare_noise(latent, seed)
                out = comfy.sample.sample(
                    self.patcher, noise, steps, cfg, COMFY_SAMPLERS.get(sampler, "euler"),
                    "simple" if self.parameterisation == "flow" else "normal", positive, negative, latent,
                    seed=seed, disable_pbar=True)
                pixels = self.vae.decode(out)
                pixels = pixels.reshape(-1, *pixels.shape[-3:])[0]  # [H, W, C] (video VAEs add a frame axis)
                array = (pixels[..., :3].float().clamp(0, 1) * 255).round().byte().cpu().numpy()
                images.append(Image.fromarray(array))
        return images

    def _conditioning(self, prompt: str):
        """The prompt's CONDITIONING as CLIPTextEncode makes it (``tokenize``, ``encode_from_tokens_scheduled``)."""
        tokens = self.clip.tokenize(prompt)
        return self.clip.encode_from_tokens_scheduled(tokens)

    def release(self) -> None:
        """The graph's model back as it was loaded: the adapters' layers taken out (the frozen weights were never
        changed), nothing trainable, eval mode."""
        from ..training.adapters import remove_adapters

        self._undo.close()  # block swap, checkpointing, the training flag: newest first
        model = self.diffusion_model
        remove_adapters(model)
        model.requires_grad_(False)
        model.eval()

    # -- data -----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> list[TextConditioning]:
        """Each prompt through the graph's CLIP, as CLIPTextEncode does (``tokenize`` then
        ``encode_from_tokens_scheduled``)."""
        if self.clip is None:
            raise NodeError(f"CLIP input: training {self.label} needs the text encoder(s) that go with it "
                            "(Load Checkpoint's CLIP, or Load CLIP / DualCLIPLoader)")
        return [TextConditioning.from_comfy(self._conditioning(prompt)) for prompt in prompts]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents in the diffusion model's space for IMAGE-layout pixels [B, H, W, C] in [0, 1]: the graph's
        VAE (``VAE.encode``, as VAEEncode) and the model's ``process_latent_in`` (the latent format's shift
        and scale the sampler applies). CPU tensors, outside inference mode."""
        self._require_vae()
        latent = self.vae.encode(pixels[..., :3])
        with torch.inference_mode(False):
            return self.base.process_latent_in(latent).detach().cpu().clone()

    def _require_vae(self) -> None:
        if self.vae is None:
            raise NodeError(f"VAE input: training {self.label} needs its VAE (Load Checkpoint's VAE or Load VAE)")

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's own noising (``model_sampling.noise_scaling``): ``sigma*noise + (1-sigma)*x0`` for flow
        models, ``x0 + sigma*noise`` (k-diffusion scaling) for eps/v models."""
        return self.model_sampling.noise_scaling(sigma.reshape(-1), noise, x0)

    def sigmas_of_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Discrete (eps/v) models: ComfyUI's sigma of DDPM timesteps 0..999 (``model_sampling.sigma``);
        ``x_ddpm = x_comfy / sqrt(1 + sigma^2)``, so diffusers-style noising converts exactly."""
        return self.model_sampling.sigma(timesteps.float())

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, conditioning, sizes=None) -> torch.Tensor:
        """The diffusion model's output in its own parameterisation (eps, v or the flow velocity) for
        ``noisy`` (as :meth:`noisy_input` makes it) at noise levels ``sigma`` [B], through ComfyUI's
        ``extra_conds`` and ``apply_model`` with the graph's transformer options. ``conditioning``: one
        :class:`TextConditioning` for the batch, or one per sample; ``sizes``: [B, 6] (original height, width,
        crop top, left, target height, width), SDXL's size conditioning (ComfyUI's defaults without it).
        Gradients flow to the adapters."""
        n = noisy.shape[0]
        conds = list(conditioning) if isinstance(conditioning, (list, tuple)) else [conditioning] * n
        if len(conds) != n:
            raise ValueError(f"{len(conds)} conditionings for a batch of {n}")
        sigma = sigma.reshape(-1).to(noisy.device, torch.float32)
        groups = self._model_conds(noisy, conds, sizes)
        if len(groups) == 1:
            return self._apply(noisy, sigma, groups[0][1])
        # samples whose conditionings ComfyUI cannot batch (e.g. captions of different token counts where the
        # model reads them unpadded) run in their own apply_model calls, as the sampler would run them
        outputs = [None] * n
        for indices, model_conds in groups:
            out = self._apply(noisy[indices], sigma[indices], model_conds)
            for j, i in enumerate(indices):
                outputs[i] = out[j:j + 1]
        return torch.cat(outputs)

    def _apply(self, noisy: torch.Tensor, sigma: torch.Tensor, model_conds: dict) -> torch.Tensor:
        """One apply_model call on a batch whose conditionings ComfyUI batched; the diffusion model's output."""
        # the diffusion model's own return value, before apply_model turns it into a denoised latent; a
        # forward hook sees it for every family (not all of them run DIFFUSION_MODEL wrappers)
        captured = []
        hook = self.diffusion_model.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            with self.training(), _keep_saved_activations():
                denoised = self.base.apply_model(noisy, sigma, **model_conds,
                                                 transformer_options=self._transformer_options(sigma))
        finally:
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{self.label}: the diffusion model ran {len(captured)} times in one apply_model")
        output = captured[0]
        if not self._checked_output:  # the hook saw the whole output: ComfyUI's own denoising agrees
            with torch.no_grad():
                again = self.model_sampling.calculate_denoised(sigma, output.float(), noisy)
                if again.shape != denoised.shape or not torch.allclose(again, denoised, atol=1e-4, rtol=1e-4):
                    raise RuntimeError(f"{self.label}: the diffusion model's output does not give ComfyUI's "
                                       "denoised latent; this ComfyUI version post-processes it elsewhere")
            self._checked_output = True
        return output.reshape(noisy.shape) if output.numel() == noisy.numel() else output

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        """The graph's transformer options (attention patches, wrappers of other nodes) with the step's
        ``sigmas``, as the sampler's ``calc_cond_batch`` passes them."""
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma
        return options

    def _model_conds(self, noisy: torch.Tensor, conds: list[TextConditioning], sizes=None) -> list:
        """``extra_conds`` per sample (as the sampler's ``encode_model_conds``), batched by ComfyUI's own
        cond classes (``process_cond``, ``can_concat`` + ``concat``; cross-attention of different lengths padded
        by repeat where the class allows it): [(sample indices, the batch's model conds)], consecutive samples
        together while they can be batched."""
        device = noisy.device
        per_sample = []
        for i, c in enumerate(conds):
            kwargs = dict(c.extras)
            kwargs.update(cross_attn=c.cond, noise=noisy[i:i + 1], latent_image=noisy[i:i + 1], device=device)
            if self.guidance is not None:
                kwargs["guidance"] = self.guidance
            if sizes is not None and self.family == "sdxl":  # what SDXL's encode_adm reads
                kwargs.update(zip(SDXL_SIZE_KEYS, (int(v) for v in sizes[i].tolist())))
            per_sample.append(self.base.extra_conds(**kwargs))
        processed = [{key: cond.process_cond(batch_size=1, device=device, area=None) for key, cond in s.items()}
                     for s in per_sample]
        runs = []  # [[indices], ...]
        for i, sample in enumerate(processed):
            first = processed[runs[-1][0]] if runs else None
            if first is not None and first.keys() == sample.keys() and \
                    all(first[key].can_concat(sample[key]) for key in first):
                runs[-1].append(i)
            else:
                runs.append([i])
        return [(indices, {key: processed[indices[0]][key].concat([processed[i][key] for i in indices[1:]])
                           for key in processed[indices[0]]}) for indices in runs]
