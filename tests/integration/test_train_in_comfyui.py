"""Issue 2 in a real ComfyUI: Load Dataset -> Train LoRA -> Apply LoRA -> KSampler -> SaveImage."""

import shutil
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "training" / "sample_dataset"


def lora_options(comfy):
    info = comfy.object_info("LoraLoader")["LoraLoader"]
    return info["input"]["required"]["lora_name"][0]


def test_train_apply_sample_in_comfyui(comfy, comfy_base_dir, sd15_checkpoint):
    nodes = comfy.package_nodes()
    for node in ("LoraTrainer_LoadDataset", "LoraTrainer_TrainLoRA", "LoraTrainer_ApplyLoRA", "LoraTrainer_MergeLoRAs"):
        assert node in nodes
    shutil.copytree(SAMPLE, comfy_base_dir / "input" / "shapes", dirs_exist_ok=True)
    assert "it_lora.safetensors" not in lora_options(comfy)
    prompt = {
        "1": {"class_type": "LoraTrainer_LoadDataset", "inputs": {"folder": "shapes"}},
        "2": {
            "class_type": "LoraTrainer_TrainLoRA",
            "inputs": {
                "checkpoint": sd15_checkpoint, "dataset": ["1", 0], "steps": 3, "learning_rate": 1e-4, "rank": 4,
                "alpha": 4.0, "resolution": 64, "batch_size": 1, "seed": 0, "output_name": "it_lora",
                "precision": "fp32",
            },
        },
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
        "4": {
            "class_type": "LoraTrainer_ApplyLoRA",
            "inputs": {"model": ["3", 0], "clip": ["3", 1], "lora": ["2", 0], "strength_model": 1.0, "strength_clip": 1.0},
        },
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "shapetoy, a red circle", "clip": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0], "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "it_lora"}},
    }
    mark = comfy.log_mark()
    entry = comfy.run(prompt, timeout=600)
    log = comfy.log_text(since=mark)
    assert entry["status"]["status_str"] == "success"
    assert "lora key not loaded" not in log, log[-3000:]
    assert (comfy_base_dir / "models" / "loras" / "it_lora.safetensors").is_file()
    assert entry["outputs"]["10"]["images"], "no image saved"
    assert "it_lora.safetensors" in lora_options(comfy)
