"""Each example workflow (UI format) converted to the API format and queued in a real ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from make_example_workflows import FROM_MODEL_INPUT, MODEL_WIDGETS
from workflow_api import set_widget, ui_to_api, widget_inputs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.object_info()


def load(name):
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def widget_value(node, name, object_info):
    """A widget's value in a UI-format node (what set_widget sets)."""
    position = 0
    for widget, control in widget_inputs(object_info[node["type"]]):
        if widget == name:
            return node["widgets_values"][position]
        position += 2 if control else 1
    raise KeyError(f"{node['type']} has no widget {name}")


def shrink(workflow, object_info, checkpoint, tag, **train):
    """Small settings for a CPU test: tiny steps and sizes, the test's checkpoint, unique output names."""
    for node in workflow["nodes"]:
        kind, nid = node["type"], node["id"]
        if kind == "LoraTrainer_LoadDataset":
            set_widget(workflow, nid, "resolution", 64, object_info)
        elif kind == "LoraTrainer_TrainLoRA":
            values = dict(checkpoint=checkpoint, steps=2, resolution=64, rank=4, precision="fp32",
                          gradient_checkpointing=False, save_every=0)
            values.update(train)
            for key, value in values.items():
                set_widget(workflow, nid, key, value, object_info)
            name = node["widgets_values"][[w for w, _ in widget_inputs(object_info[kind])].index("output_name")]
            set_widget(workflow, nid, "output_name", f"{tag}_{name}", object_info)
        elif kind == "CheckpointLoaderSimple":
            set_widget(workflow, nid, "ckpt_name", checkpoint, object_info)
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            set_widget(workflow, nid, "width", 64, object_info)
            set_widget(workflow, nid, "height", 64, object_info)
        elif kind == "KSampler":
            set_widget(workflow, nid, "steps", 2, object_info)
        elif kind == "LoraTrainer_MergeLoRAs":
            set_widget(workflow, nid, "save_name", f"{tag}_merged", object_info)
    return workflow


def test_examples_are_listed_and_convert(comfy, object_info):
    templates = comfy.get_json("/api/workflow_templates")
    listed = next((names for names in templates.values() if "train_sdxl" in names), None)
    assert listed is not None, templates
    assert sorted(listed) == sorted(p.stem for p in EXAMPLES.glob("*.json"))
    for path in EXAMPLES.glob("*.json"):
        prompt = ui_to_api(json.loads(path.read_text()), object_info)
        assert any(n["class_type"] == "LoraTrainer_TrainLoRA" for n in prompt.values()), path.name


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_examples_run_out_of_the_box(name, object_info):
    """Links join an output to an input of the same type; every dataset is one Load Dataset offers on a fresh
    install; every model file a node names (checkpoint, diffusion model, text encoders, VAE) carries its
    download and folder (the frontend's "models" convention); a Train LoRA on "(model input)" has its model,
    clip and vae connected."""
    workflow = load(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, slot, dst, dst_slot, kind in workflow["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][slot]
        socket = nodes[dst]["inputs"][dst_slot]
        assert out_type == socket["type"] == kind, (name, link_id, nodes[src]["type"], slot, socket)
        assert socket["link"] == link_id and link_id in nodes[src]["outputs"][slot]["links"]
    offered = object_info["LoraTrainer_LoadDataset"]["input"]["required"]["folder"]
    offered = offered[0] if isinstance(offered[0], list) else offered[1]["options"]
    for node in nodes.values():
        if node["type"] == "LoraTrainer_LoadDataset":
            assert node["widgets_values"][0] in offered, (name, node["widgets_values"][0], offered)
        named = [(widget_value(node, widget, object_info), directory)
                 for widget, directory in MODEL_WIDGETS.get(node["type"], [])]
        files = [(file, directory) for file, directory in named if file != FROM_MODEL_INPUT]
        models = node["properties"].get("models", [])
        assert [(m["name"], m["directory"]) for m in models] == files, (name, node["type"], models)
        for model in models:
            assert model["url"].startswith("https://") and model["url"].endswith("/" + model["name"]), model
        if (FROM_MODEL_INPUT, "checkpoints") in named:
            linked = {s["name"] for s in node["inputs"] if s["link"] is not None}
            assert {"model", "clip", "vae"} <= linked, (name, node["id"], linked)


def test_train_and_test_sd15(comfy, comfy_base_dir, object_info, sd15_checkpoint):
    workflow = shrink(load("train_and_test_sd15"), object_info, sd15_checkpoint, "ex1", sample_every=2,
                      sample_prompt="a red circle")
    # a resolution no other test gives the bundled sample: ComfyUI would run a cached Load Dataset not at all,
    # and its report would be missing from this prompt's outputs
    set_widget(workflow, 1, "resolution", 192, object_info)
    prompt = ui_to_api(workflow, object_info)
    for node in prompt.values():
        if node["class_type"] == "LoraTrainer_TrainLoRA":
            node["inputs"]["memory_limit_gb"] = 0.0
    mark = comfy.log_mark()
    entry = comfy.run(prompt, timeout=900)
    log = comfy.log_text(since=mark)
    assert "lora key not loaded" not in log
    loras = comfy_base_dir / "models" / "loras"
    assert (loras / "ex1_my_sd15_lora.safetensors").is_file()
    outputs = entry["outputs"]
    assert outputs["12"]["images"], "KSampler after training produced no image (models not reloadable?)"
    assert outputs["4"]["images"], "core Plot Loss Graph did not accept the LOSS_MAP"
    assert outputs["1"]["text"][0].startswith("8 images") and outputs["1"]["images"]
    # the run record the chart re-draws from, with the samples drawn at steps 0 and 2
    runs = comfy.get_json("/loratrainer/runs")["runs"]
    run = next(r for r in reversed(runs) if r["name"] == "ex1_my_sd15_lora")
    record = comfy.get_json(f"/api/loratrainer/runs/{run['run_id']}")
    assert record["status"] == "done" and len(record["losses"]) == 2 and record["node"] == "3"
    assert [s["step"] for s in record["samples"]] == [0, 2]
    image = record["samples"][-1]["images"][0]
    assert comfy.view(image["filename"], image["subfolder"], image["type"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_sdxl(comfy, comfy_base_dir, object_info):
    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    name = "tiny-sdxl.safetensors"
    write_tiny_checkpoint(str(comfy_base_dir / "models" / "checkpoints" / name), family="sdxl", seed=0)
    workflow = shrink(load("train_sdxl"), object_info, name, "ex2", steps=4, save_every=2, sample_every=2,
                      gradient_checkpointing=True)
    entry = comfy.run(ui_to_api(workflow, object_info), timeout=600)
    loras = comfy_base_dir / "models" / "loras"
    assert (loras / "ex2_my_sdxl_lora.safetensors").is_file()
    assert (loras / "ex2_my_sdxl_lora_step2.safetensors").is_file()
    assert entry["outputs"]["4"]["images"]
    with open(loras / "ex2_my_sdxl_lora.safetensors", "rb") as f:
        header = f.read(200_000)
    assert b"lora_unet_" in header
    # the Training Options node's settings reached the run (the file's kohya metadata records them)
    from safetensors import safe_open

    with safe_open(str(loras / "ex2_my_sdxl_lora.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_lr_scheduler"] == "cosine" and float(meta["ss_min_snr_gamma"]) == 5.0
    assert float(meta["ss_noise_offset"]) == pytest.approx(0.0357)


def tiny_flux_loaders(prompt: dict, unet_name: str) -> dict:
    """An API prompt of train_flux with its three loaders giving the tiny Flux of tiny_loaders/ (test-only nodes):
    Load Diffusion Model reads the tiny file itself where this ComfyUI's detection reads its sizes (0.33), else
    ITTinyFluxModel loads it (0.3.64); the CLIP and VAE are the stand-ins. Node ids and links stay."""
    import tiny_loaders

    for node in prompt.values():
        if node["class_type"] == "UNETLoader":
            if not tiny_loaders.unet_loader_reads_tiny_flux():
                node["class_type"], node["inputs"] = "ITTinyFluxModel", {}
            node["inputs"]["unet_name"] = unet_name
        elif node["class_type"] == "DualCLIPLoader":
            node["class_type"], node["inputs"] = "ITTinyFluxClip", {}
        elif node["class_type"] == "VAELoader":
            node["class_type"], node["inputs"] = "ITTinyFluxVae", {}
    return prompt


def test_train_flux(comfy, comfy_base_dir, comfy_lib, object_info):
    """train_flux as shipped but for the three loaders (a tiny Flux.1 dev: see tiny_flux_loaders) and CPU sizes:
    Train LoRA trains the graph's MODEL, writes a Flux LoRA, and Apply LoRA puts every module of it on the model
    the sampling branch (FluxGuidance, KSampler cfg 1, VAE Decode, Save Image) runs."""
    import tiny_loaders
    from safetensors import safe_open

    unet = tiny_loaders.write_tiny_flux(comfy_base_dir / "models" / "diffusion_models")
    workflow = shrink(load("train_flux"), object_info, FROM_MODEL_INPUT, "ex4", steps=4, sample_every=2,
                      sample_prompt="a red circle", save_every=2, gradient_checkpointing=True)
    prompt = tiny_flux_loaders(ui_to_api(workflow, object_info), unet)
    apply = next(k for k, n in prompt.items() if n["class_type"] == "LoraTrainer_ApplyLoRA")
    probe_id, probe = comfy.probe_model([apply, 0])
    prompt[probe_id] = probe
    mark = comfy.log_mark()
    entry = comfy.run(prompt, timeout=600)
    log = comfy.log_text(since=mark)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]

    loras = comfy_base_dir / "models" / "loras"
    path = loras / "ex4_my_flux_lora.safetensors"
    assert path.is_file() and (loras / "ex4_my_flux_lora_step2.safetensors").is_file()
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_dim"] == "4"
    modules = {k.split(".")[0] for k in keys}
    assert modules and all(m.startswith("lora_unet_") for m in modules), sorted(modules)[:5]
    # Apply LoRA patched ComfyUI's Flux with every module the file holds
    seen = comfy.probe_result(entry, probe_id)
    assert seen["config_class"] == "Flux" and seen["model_patches"] == len(modules), (seen["model_patches"], len(modules))

    outputs = entry["outputs"]
    assert outputs["15"]["images"], "the sampling branch after training saved no image"
    assert outputs["7"]["images"], "core Plot Loss Graph did not accept the LOSS_MAP"
    runs = comfy.get_json("/loratrainer/runs")["runs"]
    run = next(r for r in reversed(runs) if r["name"] == "ex4_my_flux_lora")
    record = comfy.get_json(f"/api/loratrainer/runs/{run['run_id']}")
    assert record["status"] == "done" and len(record["losses"]) == 4 and record["node"] == "6"
    assert [s["step"] for s in record["samples"]] == [0, 2, 4]


def test_merge_and_compare(comfy, comfy_base_dir, object_info, sd15_checkpoint):
    workflow = shrink(load("merge_and_compare"), object_info, sd15_checkpoint, "ex3")
    entry = comfy.run(ui_to_api(workflow, object_info), timeout=900)
    loras = comfy_base_dir / "models" / "loras"
    for name in ("ex3_style_a", "ex3_style_b", "ex3_merged"):
        assert (loras / f"{name}.safetensors").is_file(), name
    images = entry["outputs"]["23"]["images"]
    assert len(images) == 3  # A alone, the merge, B alone
