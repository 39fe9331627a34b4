"""LoRA tools: merge-into a checkpoint, resize, inspect, their CLI subcommands and nodes (CPU, tiny models)."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_lora_trainer.training.adapters import add_adapter
from comfyui_lora_trainer.training.cli import main
from comfyui_lora_trainer.training.formats import (
    LoraWeights,
    RunInfo,
    export_kohya,
    load_lora_file,
    lora_delta,
    make_metadata,
    module_names,
    save_lora_file,
)
from comfyui_lora_trainer.training.lora_tools import inspect_lora, merge_into_checkpoint, resize_lora
from comfyui_lora_trainer.training.models import build_tiny_components, load_base_model, tiny_tokenizer_dir, write_checkpoint

UNET = ["to_q", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, tmp_path_factory):
    """(family, checkpoint path with fp16 UNet tensors, LoRA file, adapted unet, adapted text encoders)."""
    from peft import LoraConfig

    family = request.param
    d = tmp_path_factory.mktemp(family)
    base = build_tiny_components(family, seed=0)
    ckpt = d / "base.safetensors"
    write_checkpoint(base, ckpt)
    sd = load_file(str(ckpt))  # mixed dtypes, as real checkpoints: UNet in fp16
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    sd = {k: (v.half() if k.startswith("model.diffusion_model.") else v) for k, v in sd.items()}
    save_file(sd, str(ckpt), metadata=meta)
    torch.manual_seed(1)
    unet = copy.deepcopy(base.unet).requires_grad_(False)
    add_adapter(unet, LoraConfig(r=4, lora_alpha=8, target_modules=UNET, init_lora_weights=False))
    tes = []
    for te in base.text_encoders:
        te = copy.deepcopy(te).requires_grad_(False)
        add_adapter(te, LoraConfig(r=2, lora_alpha=2, target_modules=TE, init_lora_weights=False))
        tes.append(te)
    tensors = export_kohya(family, unet=unet, text_encoders=tes).tensors
    lora = save_lora_file(d / "a.safetensors", LoraWeights(tensors, make_metadata(RunInfo(family=family, output_name="a")), family))
    return family, str(ckpt), lora, unet, tes


def _peft_modules(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_merge_into_equals_applying_the_lora(setup, tmp_path):
    family, ckpt, lora, unet, tes = setup
    out = tmp_path / "merged.safetensors"
    report = merge_into_checkpoint(ckpt, [(load_lora_file(lora), 0.7)], out)
    assert report.patched > 0 and report.family == family
    before, after = load_file(ckpt), load_file(str(out))
    assert list(after) == list(before) or set(after) == set(before)
    assert all(after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("weight") for k in changed)

    tok = tiny_tokenizer_dir()
    merged_model = load_base_model(str(out), tokenizer_dir=tok)
    base_model = load_base_model(ckpt, tokenizer_dir=tok)
    pairs = [(unet, merged_model.unet, base_model.unet)] + list(zip(tes, merged_model.text_encoders, base_model.text_encoders))
    n = 0
    for adapted, merged, original in pairs:
        merged_w = dict(merged.named_parameters())
        orig_w = dict(original.named_parameters())
        for path, layer in _peft_modules(adapted).items():
            key = path + ".weight"
            expected = orig_w[key].float() + 0.7 * layer.get_delta_weight("default").float()
            tol = 2e-3 if adapted is unet else 1e-5  # the UNet was fp16 in the file
            err = ((merged_w[key].float() - expected).norm() / expected.norm()).item()
            assert err < tol, (key, err)
            n += 1
    assert n == len(_peft_modules(unet)) + sum(len(_peft_modules(t)) for t in tes)

    with pytest.raises(FileExistsError):
        merge_into_checkpoint(ckpt, [(load_lora_file(lora), 1.0)], out)
    with pytest.raises(ValueError, match="other than the input"):
        merge_into_checkpoint(ckpt, [(load_lora_file(lora), 1.0)], ckpt)


def test_merge_into_refuses_modules_the_checkpoint_lacks(setup, tmp_path):
    family, ckpt, lora, _, _ = setup
    w = load_lora_file(lora)
    w.tensors["lora_unet_nonexistent_layer.lora_down.weight"] = torch.zeros(2, 4)
    w.tensors["lora_unet_nonexistent_layer.lora_up.weight"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="nonexistent_layer"):
        merge_into_checkpoint(ckpt, [(w, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    merge_into_checkpoint(ckpt, [(w, 1.0)], tmp_path / "x.safetensors", allow_unused=True)
    assert (tmp_path / "x.safetensors").exists()


def test_inspect_reports_blocks_metadata_and_unused(setup, tmp_path):
    family, ckpt, lora, _, _ = setup
    info = inspect_lora(lora, base=ckpt)
    assert info["family"] == family and info["format"] == "kohya"
    assert info["kinds"] == {"lora": info["modules"]} or "locon" in info["kinds"]
    assert info["sshs_model_hash_ok"] is True
    assert any(b["ranks"] == [2] for name, b in info["blocks"].items() if "te" in name)
    assert info["base"]["unused_modules"] == [] and info["base"]["used_modules"] == info["modules"]
    # a module the checkpoint does not have is listed
    w = load_lora_file(lora)
    w.tensors["lora_unet_bogus.lora_down.weight"] = torch.zeros(2, 4)
    w.tensors["lora_unet_bogus.lora_up.weight"] = torch.zeros(4, 2)
    p = save_lora_file(tmp_path / "b.safetensors", w)
    assert inspect_lora(p, base=ckpt)["base"]["unused_modules"] == ["lora_unet_bogus"]


def test_resize_reports_error_and_keeps_family(setup):
    family, _, lora, _, _ = setup
    w = load_lora_file(lora)
    small, report = resize_lora(w, rank=1)
    assert small.family == family
    for name in module_names(small):
        assert small.tensors[name + ".lora_down.weight"].shape[0] == 1
        full = lora_delta(w, name)
        s = torch.linalg.svdvals(full.reshape(full.shape[0], -1).double())
        assert report.rel_errors[name] == pytest.approx(float((s[1:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-5)
    assert small.metadata["ss_network_dim"] == "1" and small.metadata["ss_base_model_version"] == w.metadata["ss_base_model_version"]
    same, rep = resize_lora(w, rank=64)
    assert rep.overall < 1e-6


def test_cli_subcommands(setup, tmp_path, capsys):
    family, ckpt, lora, _, _ = setup
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--out", str(out), "--mode", "svd", "--rank", "2", f"{lora}:0.5", f"{lora}:-0.25"]) == 0
    text = capsys.readouterr().out
    assert "relative error" in text and os.path.isfile(out)
    merged = load_lora_file(out)
    assert json.loads(merged.metadata["lora_trainer.merge_report"])["mode"] == "svd"
    assert main(["merge", "--out", str(out), lora, lora]) == 2  # refuses to overwrite
    assert main(["resize", lora, "--out", str(tmp_path / "r.safetensors"), "--energy", "0.9"]) == 0
    assert main(["merge-into", ckpt, f"{lora}:0.5", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert "weights changed" in capsys.readouterr().out
    assert main(["inspect", lora, "--json", "--base", ckpt]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["base"]["unused_modules"] == []
    assert main(["inspect", lora]) == 0
    assert "blocks" in capsys.readouterr().out


def test_nodes_merge_eight_svd_and_info(setup, tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_host import FakeHost

    from comfyui_lora_trainer.nodes.apply import ApplyLoRA
    from comfyui_lora_trainer.nodes.inspect import LoRAInfo
    from comfyui_lora_trainer.nodes.merge import MergeLoRAs
    from comfyui_lora_trainer.nodes.spec import NodeError

    family, ckpt, lora, _, _ = setup
    host = FakeHost(tmp_path, tiny_tokenizer_dir())
    os.symlink(lora, os.path.join(host.loras_directory(), "a.safetensors"))
    os.symlink(ckpt, host.checkpoint_path("base.safetensors"))
    a, text = LoRAInfo.execute(host, lora_name="a.safetensors", checkpoint="base.safetensors").values
    assert f"family: {family}" in text and "0 unused" in text
    inputs = {}
    for i in range(1, 9):
        inputs[f"lora_{i}"], inputs[f"weight_{i}"] = a, 0.125 * (-1) ** i
    merged, name, report = MergeLoRAs.execute(host, **inputs).values
    n = module_names(a)[0]
    assert merged.tensors[n + ".lora_down.weight"].shape[0] == 8 * a.tensors[n + ".lora_down.weight"].shape[0]
    assert lora_delta(merged, n).abs().max() < 1e-5  # +1/8 -1/8 ... cancels exactly
    merged, _, report = MergeLoRAs.execute(host, lora_1=a, weight_1=1.0, lora_2=a, weight_2=0.5, mode="svd", rank=1,
                                           save_name="svd1").values
    assert "relative error" in report and os.path.isfile(os.path.join(host.loras_directory(), "svd1.safetensors"))
    with pytest.raises(NodeError, match="rank"):
        MergeLoRAs.execute(host, lora_1=a, weight_1=1.0, lora_2=a, weight_2=1.0, mode="svd", rank=0, energy=1.0)
    core = {"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.nn.Parameter(torch.zeros(4, 2))}
    ApplyLoRA.execute(host, "M", "C", 1.0, 1.0, lora_model=core)
    assert set(host.applied[-1][0]) == set(core) and not host.applied[-1][0][next(iter(core))].requires_grad
    with pytest.raises(NodeError, match="only one"):
        ApplyLoRA.execute(host, "M", "C", 1.0, 1.0, lora=a, lora_model=core)
