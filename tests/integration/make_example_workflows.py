"""Writes example_workflows/*.json (UI format) from a short description per workflow and a server's
/object_info (for widget order and socket types). Run after changing a node's inputs:

    python tests/integration/make_example_workflows.py /path/to/object_info.json

and the thumbnails from screenshots of the loaded examples (browser/user_check.mjs with examplesOnly):

    python tests/integration/make_example_workflows.py thumbnails /path/to/screenshots [NAME ...]

The integration test tests/integration/test_workflows_examples.py converts and queues each file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workflow_api import widget_inputs

from comfyui_lora_trainer.nodes.train import FROM_MODEL_INPUT  # Train LoRA's entry for the graph's MODEL

OUT = Path(__file__).resolve().parents[2] / "example_workflows"

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
# Flux.1 dev as ComfyUI's own Flux templates load it (comfyui-workflow-templates' flux_dev_full_text_to_image)
FLUX_DEV, CLIP_L, T5XXL, FLUX_VAE = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                     "ae.safetensors")
# The frontend's template convention (node properties "models": name, url, directory): its missing-models
# panel offers the download and files it under the right folder (for our Train LoRA too, which it does not know).
MODELS = {
    SD15: "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    SDXL: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    FLUX_DEV: "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
    CLIP_L: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    T5XXL: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    FLUX_VAE: "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
}
# The widgets that name a model file, and the models/ folder it goes in, per node type
MODEL_WIDGETS = {
    "CheckpointLoaderSimple": [("ckpt_name", "checkpoints")], "LoraTrainer_TrainLoRA": [("checkpoint", "checkpoints")],
    "UNETLoader": [("unet_name", "diffusion_models")], "VAELoader": [("vae_name", "vae")],
    "DualCLIPLoader": [("clip_name1", "text_encoders"), ("clip_name2", "text_encoders")],
}
# Load Dataset's bundled samples (nodes/dataset.py SAMPLE_DATASETS): the examples run before the user has data
SHAPES, PATTERNS = "sample: shapes", "sample: patterns"

# Node sizes: at least what both frontends (1.27.10, 1.49.6) compute for the node (LGraphNode.computeSize; Train
# LoRA includes its live panel), or they grow on load and cover their neighbours; image nodes get room to show one.
SIZES = {
    "LoraTrainer_LoadDataset": (300, 130), "PreviewImage": (300, 300), "LoraTrainer_TrainLoRA": (400, 760),
    "LossGraphNode": (300, 300), "CheckpointLoaderSimple": (320, 100), "LoraTrainer_ApplyLoRA": (320, 170),
    "CLIPTextEncode": (400, 200), "EmptyLatentImage": (300, 110), "KSampler": (320, 270), "VAEDecode": (210, 50),
    "SaveImage": (320, 320), "LoraTrainer_TrainingOptions": (400, 2450), "LoraTrainer_MergeLoRAs": (300, 470),
    "ImageBatch": (240, 50), "UNETLoader": (320, 110), "DualCLIPLoader": (320, 160), "VAELoader": (320, 80),
    "FluxGuidance": (320, 80), "ConditioningZeroOut": (240, 50), "EmptySD3LatentImage": (300, 110),
}
# Room kept below a node that grows once it has run: Load Dataset adds its report and its preview grid.
GROWS = {"LoraTrainer_LoadDataset": 470}
TITLE_HEIGHT, GAP, ORIGIN = 30, 50, (40, 60)


def train_values(checkpoint, steps, resolution, rank, output_name, sample_every=0, prompt="", **extra):
    values = dict(checkpoint=checkpoint, steps=steps, learning_rate=1e-4, rank=rank, alpha=float(rank),
                  resolution=resolution, batch_size=1, seed=42, output_name=output_name, precision="bf16",
                  trigger_word="", overwrite=False, gradient_checkpointing=False, sample_every=sample_every,
                  sample_prompt=prompt, save_every=0, resume=False, memory_limit_gb=0.0)
    values.update(extra)
    return values


def sampler(seed=7, steps=20, cfg=7.0, scheduler="normal"):
    return dict(seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler=scheduler, denoise=1.0)


APPLY = dict(strength_model=1.0, strength_clip=1.0, lora_name="(none: use the lora input)")

# Each workflow: nodes (id, type, widget values), columns of node ids (laid out left to right, each column's
# nodes top to bottom, sized by SIZES), links (from node, output slot, to node, input name).
WORKFLOWS = {
    "train_and_test_sd15": {
        "title": "Train a LoRA on SD1.5, then test it: Load Dataset -> Train LoRA -> Apply LoRA -> KSampler",
        "nodes": [
            (1, "LoraTrainer_LoadDataset", dict(folder=SHAPES, resolution=512)),
            (2, "PreviewImage", {}),
            (3, "LoraTrainer_TrainLoRA", train_values(SD15, 500, 512, 16, "my_sd15_lora", 100,
                                                      "shapetoy, a red circle on a white background")),
            (4, "LossGraphNode", dict(filename_prefix="loss_graph")),
            (5, "CheckpointLoaderSimple", dict(ckpt_name=SD15)),
            (6, "LoraTrainer_ApplyLoRA", dict(APPLY)),
            (7, "CLIPTextEncode", dict(text="shapetoy, a blue circle on a white background")),
            (8, "CLIPTextEncode", dict(text="blurry, low quality")),
            (9, "EmptyLatentImage", dict(width=512, height=512, batch_size=1)),
            (10, "KSampler", sampler()),
            (11, "VAEDecode", {}),
            (12, "SaveImage", dict(filename_prefix="lora_test")),
        ],
        "columns": [[1, 2], [3], [4, 5, 6], [7, 8, 9], [10], [11, 12]],
        "links": [
            (1, 2, 2, "images"), (1, 0, 3, "dataset"), (3, 1, 4, "loss"), (5, 0, 6, "model"), (5, 1, 6, "clip"),
            (3, 0, 6, "lora"), (6, 1, 7, "clip"), (6, 1, 8, "clip"), (6, 0, 10, "model"), (7, 0, 10, "positive"),
            (8, 0, 10, "negative"), (9, 0, 10, "latent_image"), (10, 0, 11, "samples"), (5, 2, 11, "vae"),
            (11, 0, 12, "images"),
        ],
    },
    "train_sdxl": {
        "title": "Train a LoRA on SDXL at 1024 px with gradient checkpointing, sample images every 100 steps and "
                 "Training Options (cosine schedule with warmup, min-SNR 5, noise offset)",
        "nodes": [
            (1, "LoraTrainer_LoadDataset", dict(folder=SHAPES, resolution=1024)),
            (2, "PreviewImage", {}),
            (3, "LoraTrainer_TrainLoRA", train_values(SDXL, 1000, 1024, 16, "my_sdxl_lora", 100,
                                                      "shapetoy, a red circle on a white background",
                                                      gradient_checkpointing=True, save_every=250)),
            (4, "LossGraphNode", dict(filename_prefix="sdxl_loss_graph")),
            (5, "LoraTrainer_TrainingOptions", dict(lr_scheduler="cosine", lr_warmup_steps=0.05, min_snr_gamma=5.0,
                                                    noise_offset=0.0357)),
        ],
        "columns": [[1, 2], [5], [3], [4]],
        "links": [(1, 2, 2, "images"), (1, 0, 3, "dataset"), (3, 1, 4, "loss"), (5, 0, 3, "options")],
    },
    "train_flux": {
        "title": "Train a LoRA on Flux.1 dev loaded by ComfyUI's own loaders (Train LoRA's checkpoint = "
                 "(model input), model/clip/vae connected), then test it: Apply LoRA -> FluxGuidance -> KSampler",
        "nodes": [
            (1, "LoraTrainer_LoadDataset", dict(folder=SHAPES, resolution=512)),
            (2, "PreviewImage", {}),
            (3, "UNETLoader", dict(unet_name=FLUX_DEV, weight_dtype="default")),
            (4, "DualCLIPLoader", dict(clip_name1=CLIP_L, clip_name2=T5XXL, type="flux", device="default")),
            (5, "VAELoader", dict(vae_name=FLUX_VAE)),
            (6, "LoraTrainer_TrainLoRA", train_values(FROM_MODEL_INPUT, 1000, 512, 16, "my_flux_lora", 250,
                                                      "shapetoy, a red circle on a white background",
                                                      gradient_checkpointing=True, save_every=250)),
            (7, "LossGraphNode", dict(filename_prefix="flux_loss_graph")),
            (8, "LoraTrainer_ApplyLoRA", dict(APPLY)),
            (9, "CLIPTextEncode", dict(text="shapetoy, a blue circle on a white background")),
            (10, "FluxGuidance", dict(guidance=3.5)),
            (11, "ConditioningZeroOut", {}),
            (12, "EmptySD3LatentImage", dict(width=1024, height=1024, batch_size=1)),
            (13, "KSampler", sampler(cfg=1.0, scheduler="simple")),
            (14, "VAEDecode", {}),
            (15, "SaveImage", dict(filename_prefix="flux_lora_test")),
        ],
        "columns": [[1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13], [14, 15]],
        "links": [
            (1, 2, 2, "images"), (1, 0, 6, "dataset"), (3, 0, 6, "model"), (4, 0, 6, "clip"), (5, 0, 6, "vae"),
            (6, 1, 7, "loss"), (3, 0, 8, "model"), (4, 0, 8, "clip"), (6, 0, 8, "lora"), (8, 1, 9, "clip"),
            (9, 0, 10, "conditioning"), (9, 0, 11, "conditioning"), (8, 0, 13, "model"), (10, 0, 13, "positive"),
            (11, 0, 13, "negative"), (12, 0, 13, "latent_image"), (13, 0, 14, "samples"), (5, 0, 14, "vae"),
            (14, 0, 15, "images"),
        ],
    },
    "merge_and_compare": {
        "title": "Merge two LoRAs and compare: each alone and the merge, same seed, one image row",
        "nodes": [
            (1, "CheckpointLoaderSimple", dict(ckpt_name=SD15)),
            (2, "LoraTrainer_LoadDataset", dict(folder=SHAPES, resolution=512)),
            (3, "LoraTrainer_LoadDataset", dict(folder=PATTERNS, resolution=512)),
            (4, "LoraTrainer_TrainLoRA", train_values(SD15, 300, 512, 8, "style_a")),
            (5, "LoraTrainer_TrainLoRA", train_values(SD15, 300, 512, 8, "style_b")),
            (6, "LoraTrainer_MergeLoRAs", dict(weight_1=0.5, weight_2=0.5, weight_3=1.0, weight_4=1.0,
                                               weight_5=1.0, weight_6=1.0, weight_7=1.0, weight_8=1.0,
                                               mode="exact", rank=0, energy=1.0, save_name="style_a_b_merged")),
            (7, "LoraTrainer_ApplyLoRA", dict(APPLY)),
            (8, "LoraTrainer_ApplyLoRA", dict(APPLY)),
            (9, "LoraTrainer_ApplyLoRA", dict(APPLY)),
            (10, "CLIPTextEncode", dict(text="shapetoy, a house by a lake")),
            (11, "CLIPTextEncode", dict(text="a house by a lake")),
            (12, "CLIPTextEncode", dict(text="patterntoy, a house by a lake")),
            (13, "CLIPTextEncode", dict(text="blurry")),
            (14, "EmptyLatentImage", dict(width=512, height=512, batch_size=1)),
            (15, "KSampler", sampler()),
            (16, "KSampler", sampler()),
            (17, "KSampler", sampler()),
            (18, "VAEDecode", {}),
            (19, "VAEDecode", {}),
            (20, "VAEDecode", {}),
            (21, "ImageBatch", {}),
            (22, "ImageBatch", {}),
            (23, "SaveImage", dict(filename_prefix="merge_compare_a_merged_b")),
        ],
        "columns": [[2, 3, 1], [4], [5], [6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22],
                    [23]],
        "links": [
            (2, 0, 4, "dataset"), (3, 0, 5, "dataset"), (4, 0, 6, "lora_1"), (5, 0, 6, "lora_2"),
            (1, 0, 7, "model"), (1, 1, 7, "clip"), (4, 0, 7, "lora"),
            (1, 0, 8, "model"), (1, 1, 8, "clip"), (6, 0, 8, "lora"),
            (1, 0, 9, "model"), (1, 1, 9, "clip"), (5, 0, 9, "lora"),
            (7, 1, 10, "clip"), (8, 1, 11, "clip"), (9, 1, 12, "clip"), (1, 1, 13, "clip"),
            (7, 0, 15, "model"), (10, 0, 15, "positive"), (13, 0, 15, "negative"), (14, 0, 15, "latent_image"),
            (8, 0, 16, "model"), (11, 0, 16, "positive"), (13, 0, 16, "negative"), (14, 0, 16, "latent_image"),
            (9, 0, 17, "model"), (12, 0, 17, "positive"), (13, 0, 17, "negative"), (14, 0, 17, "latent_image"),
            (15, 0, 18, "samples"), (1, 2, 18, "vae"), (16, 0, 19, "samples"), (1, 2, 19, "vae"),
            (17, 0, 20, "samples"), (1, 2, 20, "vae"),
            (18, 0, 21, "image1"), (19, 0, 21, "image2"), (21, 0, 22, "image1"), (20, 0, 22, "image2"),
            (22, 0, 23, "images"),
        ],
    },
}


def layout(spec: dict) -> dict:
    """{node id: (x, y)}: columns left to right, a column's nodes top to bottom, GAP apart (titles included)."""
    kinds = {node_id: kind for node_id, kind, _ in spec["nodes"]}
    positions, x = {}, ORIGIN[0]
    for column in spec["columns"]:
        y = ORIGIN[1]
        for node_id in column:
            positions[node_id] = (x, y)
            y += max(SIZES[kinds[node_id]][1], GROWS.get(kinds[node_id], 0)) + TITLE_HEIGHT + GAP
        x += max(SIZES[kinds[node_id]][0] for node_id in column) + GAP
    assert sorted(positions) == sorted(kinds), "every node in exactly one column"
    return positions


def build(spec: dict, object_info: dict) -> dict:
    nodes, links = {}, []
    positions = layout(spec)
    for order, (node_id, kind, widgets) in enumerate(spec["nodes"]):
        info = object_info[kind]
        values = []
        for name, control in widget_inputs(info):
            if name not in widgets:
                section = "required" if name in info["input"].get("required", {}) else "optional"
                default = info["input"][section][name][1].get("default")
                widgets[name] = default
            values.append(widgets[name])
            if control:
                values.append("fixed")
        sockets = []
        for section in ("required", "optional"):
            for name in (info.get("input_order") or {}).get(section, list(info["input"].get(section, {}))):
                input_spec = info["input"][section][name]
                kind_of = input_spec[0]
                if isinstance(kind_of, list) or kind_of in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    continue
                sockets.append({"name": name, "type": kind_of, "link": None})
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))]
        nodes[node_id] = {
            "id": node_id, "type": kind, "pos": list(positions[node_id]), "size": list(SIZES[kind]), "flags": {},
            "order": order, "mode": 0, "inputs": sockets, "outputs": outputs,
            "properties": {"Node name for S&R": kind}, "widgets_values": values,
        }
        models = [{"name": widgets[name], "url": MODELS[widgets[name]], "directory": directory}
                  for name, directory in MODEL_WIDGETS.get(kind, []) if widgets[name] != FROM_MODEL_INPUT]
        if models:
            nodes[node_id]["properties"]["models"] = models
    for link_id, (src, slot, dst, name) in enumerate(spec["links"], 1):
        source, target = nodes[src], nodes[dst]
        socket = next((s for s in target["inputs"] if s["name"] == name), None)
        if socket is None:
            raise KeyError(f"{target['type']} has no socket {name}")
        socket["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        links.append([link_id, src, slot, dst, target["inputs"].index(socket), source["outputs"][slot]["type"]])
    return {
        "last_node_id": max(nodes), "last_link_id": len(links), "nodes": list(nodes.values()), "links": links,
        "groups": [], "config": {}, "extra": {"info": {"title": spec["title"]}}, "version": 0.4,
    }


def thumbnails(screenshots: str, names: list[str] | None = None, width: int = 640) -> None:
    """example_workflows/<name>.jpg (the template browser's thumbnails) from browser/user_check.mjs's screenshots
    of each loaded example (run with examplesOnly): the graph's part of the page, trimmed, small JPEGs. Every
    example, or only ``names``."""
    from PIL import Image

    for path in sorted(OUT.glob("*.json")):
        if names and path.stem not in names:
            continue
        shot = Image.open(Path(screenshots) / f"{path.stem}.png").convert("RGB")
        w, h = shot.size
        canvas = shot.crop((70, 85, w, h - 90))  # without the side bar, the tab and menu bars, the canvas toolbar
        bright = canvas.convert("L").point(lambda v: 255 if v > 45 else 0)  # nodes and links, not the background
        x0, y0, x1, y1 = bright.getbbox() or (0, 0, *canvas.size)
        pad = 16
        graph = canvas.crop((max(0, x0 - pad), max(0, y0 - pad), min(canvas.width, x1 + pad),
                             min(canvas.height, y1 + pad)))
        graph.thumbnail((width, width))
        target = OUT / f"{path.stem}.jpg"
        graph.save(target, "JPEG", quality=80, optimize=True)
        print("wrote", target, graph.size, target.stat().st_size, "bytes")


def main(object_info_path: str) -> None:
    object_info = json.loads(Path(object_info_path).read_text())
    OUT.mkdir(exist_ok=True)
    for name, spec in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build(json.loads(json.dumps(spec)), object_info), indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    if sys.argv[1] == "thumbnails":
        thumbnails(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1])
