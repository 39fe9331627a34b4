"""Writes example_workflows/*.json (UI format) from a short description per workflow and a server's
/object_info (for widget order and socket types). Run after changing a node's inputs:

    python tests/integration/make_example_workflows.py /path/to/object_info.json

The integration test tests/integration/test_workflows_examples.py converts and queues each file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workflow_api import widget_inputs

OUT = Path(__file__).resolve().parents[2] / "example_workflows"

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"


def train_values(checkpoint, steps, resolution, rank, output_name, sample_every=0, prompt="", **extra):
    values = dict(checkpoint=checkpoint, steps=steps, learning_rate=1e-4, rank=rank, alpha=float(rank),
                  resolution=resolution, batch_size=1, seed=42, output_name=output_name, precision="bf16",
                  trigger_word="", overwrite=False, gradient_checkpointing=False, sample_every=sample_every,
                  sample_prompt=prompt, save_every=0, resume=False, memory_limit_gb=0.0)
    values.update(extra)
    return values


def sampler(seed=7, steps=20, cfg=7.0):
    return dict(seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)


WORKFLOWS = {
    "train_and_test_sd15": {
        "title": "Train a LoRA on SD1.5, then test it: Load Dataset -> Train LoRA -> Apply LoRA -> KSampler",
        "nodes": [
            (1, "LoraTrainer_LoadDataset", dict(folder="my_dataset", resolution=512), (40, 60)),
            (2, "PreviewImage", {}, (40, 420)),
            (3, "LoraTrainer_TrainLoRA", train_values(SD15, 500, 512, 16, "my_sd15_lora", 100,
                                                      "a photo of sks dog"), (420, 60)),
            (4, "LossGraphNode", dict(filename_prefix="loss_graph"), (900, 60)),
            (5, "CheckpointLoaderSimple", dict(ckpt_name=SD15), (420, 700)),
            (6, "LoraTrainer_ApplyLoRA", dict(strength_model=1.0, strength_clip=1.0,
                                              lora_name="(none: use the lora input)"), (900, 420)),
            (7, "CLIPTextEncode", dict(text="a photo of sks dog on the beach"), (1260, 300)),
            (8, "CLIPTextEncode", dict(text="blurry, low quality"), (1260, 520)),
            (9, "EmptyLatentImage", dict(width=512, height=512, batch_size=1), (1260, 740)),
            (10, "KSampler", sampler(), (1620, 300)),
            (11, "VAEDecode", {}, (1980, 300)),
            (12, "SaveImage", dict(filename_prefix="lora_test"), (2220, 300)),
        ],
        "links": [
            (1, 0, 2, "images"), (1, 0, 3, "dataset"), (3, 1, 4, "loss"), (5, 0, 6, "model"), (5, 1, 6, "clip"),
            (3, 0, 6, "lora"), (6, 1, 7, "clip"), (6, 1, 8, "clip"), (6, 0, 10, "model"), (7, 0, 10, "positive"),
            (8, 0, 10, "negative"), (9, 0, 10, "latent_image"), (10, 0, 11, "samples"), (5, 2, 11, "vae"),
            (11, 0, 12, "images"),
        ],
    },
    "train_sdxl": {
        "title": "Train a LoRA on SDXL at 1024 px with gradient checkpointing, sample images every 100 steps and "
                 "Training Options (cosine schedule with warmup, min-SNR 5, noise offset)",
        "nodes": [
            (1, "LoraTrainer_LoadDataset", dict(folder="my_dataset", resolution=1024), (40, 60)),
            (2, "PreviewImage", {}, (40, 420)),
            (3, "LoraTrainer_TrainLoRA", train_values(SDXL, 1000, 1024, 16, "my_sdxl_lora", 100,
                                                      "a photo of sks dog", gradient_checkpointing=True,
                                                      save_every=250), (420, 60)),
            (4, "LossGraphNode", dict(filename_prefix="sdxl_loss_graph"), (900, 60)),
            (5, "LoraTrainer_TrainingOptions", dict(lr_scheduler="cosine", lr_warmup_steps=0.05, min_snr_gamma=5.0,
                                                    noise_offset=0.0357), (40, 760)),
        ],
        "links": [(1, 0, 2, "images"), (1, 0, 3, "dataset"), (3, 1, 4, "loss"), (5, 0, 3, "options")],
    },
    "merge_and_compare": {
        "title": "Merge two LoRAs and compare: each alone and the merge, same seed, one image row",
        "nodes": [
            (1, "CheckpointLoaderSimple", dict(ckpt_name=SD15), (40, 300)),
            (2, "LoraTrainer_LoadDataset", dict(folder="style_a", resolution=512), (40, 40)),
            (3, "LoraTrainer_LoadDataset", dict(folder="style_b", resolution=512), (40, 160)),
            (4, "LoraTrainer_TrainLoRA", train_values(SD15, 300, 512, 8, "style_a"), (400, 0)),
            (5, "LoraTrainer_TrainLoRA", train_values(SD15, 300, 512, 8, "style_b"), (400, 420)),
            (6, "LoraTrainer_MergeLoRAs", dict(weight_1=0.5, weight_2=0.5, weight_3=1.0, weight_4=1.0,
                                               weight_5=1.0, weight_6=1.0, weight_7=1.0, weight_8=1.0,
                                               mode="exact", rank=0, energy=1.0, save_name="style_a_b_merged"),
             (800, 200)),
            (7, "LoraTrainer_ApplyLoRA", dict(strength_model=1.0, strength_clip=1.0,
                                              lora_name="(none: use the lora input)"), (1150, 0)),
            (8, "LoraTrainer_ApplyLoRA", dict(strength_model=1.0, strength_clip=1.0,
                                              lora_name="(none: use the lora input)"), (1150, 260)),
            (9, "LoraTrainer_ApplyLoRA", dict(strength_model=1.0, strength_clip=1.0,
                                              lora_name="(none: use the lora input)"), (1150, 520)),
            (10, "CLIPTextEncode", dict(text="a house by a lake"), (1500, 0)),
            (11, "CLIPTextEncode", dict(text="a house by a lake"), (1500, 260)),
            (12, "CLIPTextEncode", dict(text="a house by a lake"), (1500, 520)),
            (13, "CLIPTextEncode", dict(text="blurry"), (1500, 780)),
            (14, "EmptyLatentImage", dict(width=512, height=512, batch_size=1), (1500, 1000)),
            (15, "KSampler", sampler(), (1850, 0)),
            (16, "KSampler", sampler(), (1850, 260)),
            (17, "KSampler", sampler(), (1850, 520)),
            (18, "VAEDecode", {}, (2200, 0)),
            (19, "VAEDecode", {}, (2200, 260)),
            (20, "VAEDecode", {}, (2200, 520)),
            (21, "ImageBatch", {}, (2450, 130)),
            (22, "ImageBatch", {}, (2450, 400)),
            (23, "SaveImage", dict(filename_prefix="merge_compare_a_merged_b"), (2700, 260)),
        ],
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


def build(spec: dict, object_info: dict) -> dict:
    nodes, links = {}, []
    for order, (node_id, kind, widgets, pos) in enumerate(spec["nodes"]):
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
            "id": node_id, "type": kind, "pos": list(pos), "size": [320, 200], "flags": {}, "order": order,
            "mode": 0, "inputs": sockets, "outputs": outputs, "properties": {"Node name for S&R": kind},
            "widgets_values": values,
        }
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


def main(object_info_path: str) -> None:
    object_info = json.loads(Path(object_info_path).read_text())
    OUT.mkdir(exist_ok=True)
    for name, spec in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build(json.loads(json.dumps(spec)), object_info), indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1])
