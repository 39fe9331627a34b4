"""The random SD1.5 checkpoint written by training.models.write_checkpoint loads in ComfyUI as SD15
and runs a core txt2img graph on CPU (core nodes + the test-only probe node)."""

from __future__ import annotations

import re
import time

BAD_LOG_PATTERNS = [
    r"not a checkpoint file",
    r"unet missing",
    r"unet unexpected",
    r"clip missing",
    r"Missing VAE keys",
    r"Could not detect model type",
    r"no CLIP/text encoder weights",
    r"no match \{",
]


def txt2img_prompt(ckpt_name: str, steps: int = 2, size: int = 64, seed: int = 0) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "it_sd15"}},
    }


def test_random_sd15_checkpoint_runs_in_comfyui(comfy, comfy_base_dir, sd15_checkpoint):
    listed = comfy.node_info("CheckpointLoaderSimple")["input"]["required"]["ckpt_name"][0]
    assert sd15_checkpoint in listed

    prompt = txt2img_prompt(sd15_checkpoint)
    pid, node = comfy.probe_model(["ckpt", 0], ["ckpt", 1], ["ckpt", 2])
    prompt[pid] = node
    mark = comfy.log_mark()
    t0 = time.monotonic()
    entry = comfy.run(prompt, timeout=300)
    seconds = time.monotonic() - t0
    log = comfy.log_text(since=mark)
    print(f"\n[comfy] SD1.5 random checkpoint: load + 2-step 64x64 txt2img + decode took {seconds:.1f} s")

    probe = comfy.probe_result(entry)
    assert probe["config_class"] == "SD15", probe
    assert probe["model_type"] == "EPS", probe
    assert probe["unet_config"]["context_dim"] == 768
    assert probe["unet_config"]["model_channels"] == 320
    assert probe["clip_class"] == "SD1ClipModel", probe
    assert probe["vae_class"] == "AutoencoderKL", probe

    bad = [ln for ln in log.splitlines() if any(re.search(p, ln) for p in BAD_LOG_PATTERNS)]
    assert not bad, "\n".join(bad)[:8000]

    img = entry["outputs"]["save"]["images"][0]
    assert (comfy_base_dir / "output" / img["subfolder"] / img["filename"]).is_file()
    assert seconds < 120, f"txt2img took {seconds:.1f} s"


def test_interrupt_stops_a_running_prompt(comfy, sd15_checkpoint):
    prompt = txt2img_prompt(sd15_checkpoint, steps=200, seed=123)
    t0 = time.monotonic()
    pid = comfy.queue(prompt)
    comfy.wait_running(pid, timeout=120)
    time.sleep(1.0)
    comfy.interrupt(pid)
    entry = comfy.wait(pid, timeout=120)
    seconds = time.monotonic() - t0
    assert entry["status"]["status_str"] == "error"
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert seconds < 60, f"interrupt took {seconds:.1f} s"
    assert comfy.queue_state()["queue_running"] == []
