"""The node layer through the host's test double (no ComfyUI needed)."""

import os
import shutil

import pytest
import torch

from comfyui_lora_trainer.nodes import NODE_SPECS
from comfyui_lora_trainer.nodes.apply import NO_FILE, ApplyLoRA
from comfyui_lora_trainer.nodes.dataset import LoadDataset, dataset_folders
from comfyui_lora_trainer.nodes import runs
from comfyui_lora_trainer.nodes.merge import MergeLoRAs
from comfyui_lora_trainer.nodes.spec import NodeError
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint

from fake_host import FakeHost, InterruptProcessing

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


@pytest.fixture()
def host(tmp_path):
    h = FakeHost(tmp_path, tiny_tokenizer_dir())
    write_tiny_checkpoint(h.checkpoint_path("tiny.safetensors"), family="sd1", seed=0)
    shutil.copytree(SAMPLE, os.path.join(h.input_directory(), "shapes"))
    return h


def train_inputs(dataset, **over):
    values = dict(
        checkpoint="tiny.safetensors", dataset=dataset, steps=6, learning_rate=1e-3, rank=4, alpha=4.0,
        resolution=64, batch_size=2, seed=1, output_name="node_lora", precision="fp32",
    )
    values.update(over)
    return values


def test_node_ids_carry_the_prefix_and_are_unique():
    ids = [spec.node_id for spec in NODE_SPECS]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("LoraTrainer_") for i in ids)


def test_load_dataset_lists_input_folders_and_refuses_escape(host):
    assert dataset_folders(host) == ["shapes"]
    dataset, report, grid = LoadDataset.execute(host, folder="shapes").values
    assert dataset.num_images == 8 and "8 images" in report
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    with pytest.raises(NodeError, match="inside ComfyUI's input directory"):
        LoadDataset.execute(host, folder="../models")
    first = LoadDataset.fingerprint(host, folder="shapes")
    with open(os.path.join(host.input_directory(), "shapes", "00_red_circle.txt"), "w") as f:
        f.write("changed caption")
    assert LoadDataset.fingerprint(host, folder="shapes") != first


def test_train_writes_file_returns_lora_and_loss(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    result = TrainLoRA.execute(host, **train_inputs(dataset))
    lora, loss, file_name = result.values
    assert file_name == "node_lora.safetensors"
    assert os.path.isfile(os.path.join(host.loras_directory(), file_name))
    assert len(loss["loss"]) == 6 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert [v for v, _ in host.progress_values] == [1, 2, 3, 4, 5, 6]
    assert any(event == "loratrainer.saved" for event, _ in host.sent)
    assert host.freed >= 1
    assert any(k.endswith(".lora_down.weight") for k in lora.tensors)
    # a second run under the same name is refused before any training
    with pytest.raises(NodeError, match="already exists"):
        TrainLoRA.execute(host, **train_inputs(dataset))
    with pytest.raises(NodeError, match="output_name"):
        TrainLoRA.execute(host, **train_inputs(dataset, output_name="../escape"))


def test_cancel_saves_the_work_then_resume_matches_an_uninterrupted_run(host):
    host.stop_after_steps = 2
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    with pytest.raises(InterruptProcessing):
        TrainLoRA.execute(host, **train_inputs(dataset, output_name="cancelled"))
    # the state goes to the host's state folder, not models/loras (where LoraLoader would list a .pt)
    assert sorted(os.listdir(host.loras_directory())) == ["cancelled_interrupted_step2.safetensors"]
    assert host.state_directory() != host.loras_directory()
    assert os.listdir(host.state_directory()) == ["cancelled_state_step2.pt"]
    cancelled_losses = list(runs.REGISTRY.get(runs.REGISTRY.summaries()[-1]["run_id"])["losses"])
    assert len(cancelled_losses) == 2
    host.stop_after_steps = None
    resumed, loss, name = TrainLoRA.execute(host, **train_inputs(dataset, output_name="cancelled"), resume=True).values
    assert name == "cancelled.safetensors" and len(loss["loss"]) == 6
    assert loss["loss"][:2] == cancelled_losses  # the LOSS_MAP starts at step 1, not at the resumed step
    assert not any(n.endswith(".pt") for n in os.listdir(host.loras_directory()))
    straight, straight_loss, _ = TrainLoRA.execute(host, **train_inputs(dataset, output_name="straight")).values
    assert set(resumed.tensors) == set(straight.tensors)
    for key, value in straight.tensors.items():
        assert torch.equal(resumed.tensors[key], value), key
    assert loss["loss"] == pytest.approx(straight_loss["loss"])
    with pytest.raises(NodeError, match="no saved state"):
        TrainLoRA.execute(host, **train_inputs(dataset, output_name="never_ran"), resume=True)


def test_resume_finds_a_state_an_older_version_left_in_models_loras(host):
    host.stop_after_steps = 2
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    with pytest.raises(InterruptProcessing):
        TrainLoRA.execute(host, **train_inputs(dataset, output_name="old"))
    # as an older version wrote it: next to the LoRAs
    shutil.move(os.path.join(host.state_directory(), "old_state_step2.pt"), host.loras_directory())
    host.stop_after_steps = None
    _, loss, name = TrainLoRA.execute(host, **train_inputs(dataset, output_name="old"), resume=True).values
    assert name == "old.safetensors" and len(loss["loss"]) == 6
    assert any("resumed from" in text and "old_state_step2.pt" in text for _, text in host.texts)
    with pytest.raises(NodeError, match="no saved state for 'never_ran' in .*loratrainer_state"):
        TrainLoRA.execute(host, **train_inputs(dataset, output_name="never_ran"), resume=True)


def test_resume_takes_the_newest_state_of_both_folders(host, tmp_path):
    from comfyui_lora_trainer.nodes.train import state_path_for

    old, new = host.loras_directory(), host.state_directory()
    os.makedirs(new, exist_ok=True)
    for folder, step in ((old, 7), (new, 5), (new, 3)):
        open(os.path.join(folder, f"x_state_step{step}.pt"), "wb").close()
    assert state_path_for([new, old], "x") == os.path.join(old, "x_state_step7.pt")
    open(os.path.join(new, "x_state_step9.pt"), "wb").close()
    assert state_path_for([new, old], "x") == os.path.join(new, "x_state_step9.pt")
    assert state_path_for([new, old], "y") is None


def test_apply_and_merge(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    lora = TrainLoRA.execute(host, **train_inputs(dataset, steps=2)).values[0]
    model, clip = ApplyLoRA.execute(host, "M", "C", 0.8, 0.5, lora=lora).values
    assert model == ("patched", "M") and host.applied[-1][1:] == (0.8, 0.5)
    assert host.applied[-1][0] is lora.tensors
    ApplyLoRA.execute(host, "M", "C", 1.0, 1.0, lora_name="node_lora.safetensors")
    assert set(host.applied[-1][0]) == set(lora.tensors)
    with pytest.raises(NodeError, match="no LoRA"):
        ApplyLoRA.execute(host, "M", "C", 1.0, 1.0, lora=None, lora_name=NO_FILE)
    merged, file_name, _report = MergeLoRAs.execute(
        host, lora_1=lora, weight_1=0.5, lora_2=lora, weight_2=-0.25, save_name="merged"
    ).values
    assert file_name == "merged.safetensors"
    assert os.path.isfile(os.path.join(host.loras_directory(), "merged.safetensors"))
    name = next(k for k in merged.tensors if k.endswith(".lora_down.weight"))
    assert merged.tensors[name].shape[0] == 2 * lora.tensors[name].shape[0]
