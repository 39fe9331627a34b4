"""Issue 7, bad model input: unsupported family, truncated checkpoint, pickles, a LoRA for another base
model. Each is refused with an error naming the file and what to do; nothing is written, no code in a
pickle runs, and no LoRA is half-applied."""

import os

import pytest
import torch

from comfyui_lora_trainer.nodes.apply import ApplyLoRA, lora_context_dim
from comfyui_lora_trainer.nodes.dataset import LoadDataset
from comfyui_lora_trainer.nodes.spec import NodeError
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.formats import LoraWeights, save_lora_file
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import (
    UnsupportedModelError,
    load_base_model,
    tiny_tokenizer_dir,
)
from comfyui_lora_trainer.training.models.loader import read_checkpoint

from fake_host import FakeHost
from reliability import corpus

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def test_unsupported_family_is_named(tmp_path):
    path = corpus.write_unsupported_checkpoint(tmp_path / "dit.safetensors")
    with pytest.raises(UnsupportedModelError) as info:
        load_base_model(path, tiny_tokenizer_dir())
    message = str(info.value)
    assert path in message and "not supported" in message and "SDXL" in message  # names what is supported


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0001])
def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path, tiny_checkpoint, keep):
    path = corpus.write_truncated_copy(tiny_checkpoint, tmp_path / "cut.safetensors", keep)
    with pytest.raises(ValueError) as info:
        load_base_model(path, tiny_tokenizer_dir())
    message = str(info.value)
    assert path in message and ("truncated" in message or "not a safetensors" in message or "not a valid" in message)
    assert "Re-download" in message or "safetensors" in message


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path, ext):
    marker = tmp_path / "code_ran"
    path = corpus.write_malicious_pickle(tmp_path / f"evil{ext}", marker)
    with pytest.raises(ValueError, match="refusing to load this pickle"):
        load_base_model(path, tiny_tokenizer_dir())
    assert not marker.exists()
    # control: the payload is live, plain pickle loading would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_weights_pickle_loads_with_weights_only(tmp_path, tiny_checkpoint):
    state_dict, _ = read_checkpoint(tiny_checkpoint)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state_dict}, path)
    base = load_base_model(str(path), tiny_tokenizer_dir())
    assert base.family == "sd1"


def test_training_on_a_truncated_checkpoint_writes_nothing(tmp_path, tiny_checkpoint):
    path = corpus.write_truncated_copy(tiny_checkpoint, tmp_path / "cut.safetensors", 0.5)
    out = tmp_path / "out"
    config = TrainConfig(checkpoint=path, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir=str(out),
                         output_name="x", steps=1, rank=2, alpha=2.0, resolution=64, device="cpu")
    with pytest.raises(ValueError, match="cut.safetensors"):
        train(config)
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("kind", ["unsupported", "truncated"])
def test_train_node_with_a_bad_checkpoint_names_it_and_writes_nothing(host, tiny_checkpoint, kind):
    target = host.checkpoint_path("bad.safetensors")
    if kind == "unsupported":
        corpus.write_unsupported_checkpoint(target)
    else:
        corpus.write_truncated_copy(tiny_checkpoint, target, 0.5)
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    with pytest.raises(Exception, match="bad.safetensors") as info:
        TrainLoRA.execute(host, checkpoint="bad.safetensors", dataset=dataset, steps=1, learning_rate=1e-3, rank=2,
                          alpha=2.0, resolution=64, batch_size=1, seed=0, output_name="x", precision="fp32")
    assert isinstance(info.value, ValueError)  # UnsupportedModelError / ValueError / NodeError: a user error
    assert os.listdir(host.loras_directory()) == []


# -- a LoRA for another base model ----------------------------------------------------------------


class ModelHost(FakeHost):
    """The fake host, with models that say which text-context width they read (as ComfyHost does)."""

    def model_context_dim(self, model):
        return {"SD15": 768, "SD2": 1024, "SDXL": 2048}.get(model)


def test_lora_context_width_is_read_from_its_shapes(tmp_path, tiny_checkpoint):
    assert lora_context_dim(corpus.sdxl_lora_tensors()) == 2048
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)}
    assert lora_context_dim(sd1) == 768
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": torch.zeros(4, 1024)}
    assert lora_context_dim(peft) == 1024
    assert lora_context_dim({"lora_unet_x_attn1_to_q.lora_down.weight": torch.zeros(4, 320)}) is None


def test_sdxl_lora_on_an_sd15_model_is_refused_not_half_applied(tmp_path):
    host = ModelHost(tmp_path, tiny_tokenizer_dir())
    lora = LoraWeights(corpus.sdxl_lora_tensors(), {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl")
    with pytest.raises(NodeError, match=r"made for SDXL but the model is SD1\.x; nothing was applied"):
        ApplyLoRA.execute(host, "SD15", "CLIP", 1.0, 1.0, lora=lora)
    save_lora_file(os.path.join(host.loras_directory(), "xl.safetensors"), lora)
    with pytest.raises(NodeError, match=r"xl\.safetensors: this LoRA was made for SDXL"):
        ApplyLoRA.execute(host, "SD15", "CLIP", 1.0, 1.0, lora_name="xl.safetensors")
    assert host.applied == []  # nothing was patched
    # the same LoRA on an SDXL model, and a LoRA whose base cannot be told, apply as before
    ApplyLoRA.execute(host, "SDXL", "CLIP", 1.0, 1.0, lora=lora)
    ApplyLoRA.execute(host, "unknown", "CLIP", 1.0, 1.0, lora=lora)
    assert len(host.applied) == 2
