"""The node layer through the host's test double (no ComfyUI needed)."""

import json
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
    assert dataset_folders(host) == ["shapes", "sample: shapes", "sample: patterns"]
    dataset, report, grid = LoadDataset.execute(host, folder="shapes").values
    assert dataset.num_images == 8 and "8 images" in report
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    with pytest.raises(NodeError, match="inside ComfyUI's input directory"):
        LoadDataset.execute(host, folder="../models")
    first = LoadDataset.fingerprint(host, folder="shapes")
    with open(os.path.join(host.input_directory(), "shapes", "00_red_circle.txt"), "w") as f:
        f.write("changed caption")
    assert LoadDataset.fingerprint(host, folder="shapes") != first


def test_load_dataset_offers_the_bundled_samples(host):
    # the example workflows train on these, so they must load with an empty input folder
    for name in ("sample: shapes", "sample: patterns"):
        dataset, report, _ = LoadDataset.execute(host, folder=name).values
        assert dataset.num_images == 8 and "8 images" in report, name
        assert not dataset.report.unreadable, name


def test_train_writes_file_returns_lora_and_loss(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    result = TrainLoRA.execute(host, **train_inputs(dataset))
    lora, loss, file_name, validation_loss = result.values
    assert validation_loss == {"loss": []}  # no held-out images: an empty second LOSS_MAP
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
    resumed, loss, name, _ = TrainLoRA.execute(host, **train_inputs(dataset, output_name="cancelled"), resume=True).values
    assert name == "cancelled.safetensors" and len(loss["loss"]) == 6
    assert loss["loss"][:2] == cancelled_losses  # the LOSS_MAP starts at step 1, not at the resumed step
    assert not any(n.endswith(".pt") for n in os.listdir(host.loras_directory()))
    straight, straight_loss, _, _ = TrainLoRA.execute(host, **train_inputs(dataset, output_name="straight")).values
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
    _, loss, name, _ = TrainLoRA.execute(host, **train_inputs(dataset, output_name="old"), resume=True).values
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


# -- Training Options ------------------------------------------------------------------------------------
def test_training_options_table_is_train_config_keys_and_defaults_change_nothing(host):
    import dataclasses

    from comfyui_lora_trainer.nodes.options import TABLE, TrainingOptions
    from comfyui_lora_trainer.training.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    keys = [row.key for row in TABLE]
    assert len(set(keys)) == len(keys) and set(keys) <= fields
    assert [i.name for i in TrainingOptions.inputs] == ["options", *keys]
    # Train LoRA's own inputs (and what it derives from them) are not options: they would be ignored
    own = {"checkpoint", "dataset", "steps", "learning_rate", "rank", "alpha", "resolution", "batch_size", "seed",
           "output_name", "precision", "trigger_word", "overwrite", "gradient_checkpointing", "sample_every_n_steps",
           "sample_prompts", "save_every_n_steps", "resume_from", "state_dir", "output_dir", "device", "tokenizer"}
    assert not own & set(keys)
    widgets = {i.name: i.default for i in TrainingOptions.inputs[1:]}
    assert TrainingOptions.execute(host, **widgets).values == ({},)  # all defaults: nothing to override
    assert TrainingOptions.execute(host).values == ({},)  # an API prompt may leave every key out


def test_training_options_change_the_trained_run(host):
    from comfyui_lora_trainer.nodes.options import TrainingOptions

    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    (loha,) = TrainingOptions.execute(host, adapter="loha", conv_rank=0).values
    assert loha == {"adapter": "loha"}
    lora, _, name, _ = TrainLoRA.execute(host, **train_inputs(dataset, steps=2, output_name="as_loha"),
                                      options=loha).values
    with open(os.path.join(host.loras_directory(), name), "rb") as f:
        header = f.read(100_000)
    assert b"hada_w1_a" in header and b"lora_down" not in header
    # loss_type changes the losses of the same seeded run; the same run without options is the mse one
    _, mse, _, _ = TrainLoRA.execute(host, **train_inputs(dataset, steps=3, output_name="mse")).values
    (l1,) = TrainingOptions.execute(host, loss_type="l1").values
    _, with_l1, _, _ = TrainLoRA.execute(host, **train_inputs(dataset, steps=3, output_name="l1"), options=l1).values
    assert with_l1["loss"] != pytest.approx(mse["loss"], rel=1e-3)
    # step 1 sees the same weights, batch, noise and timesteps: mean|r| <= sqrt(mean r^2) (Jensen)
    assert with_l1["loss"][0] <= mse["loss"][0] ** 0.5 + 1e-6


def test_training_options_chain_and_train_inputs_win(host):
    from comfyui_lora_trainer.nodes.options import TrainingOptions

    (first,) = TrainingOptions.execute(host, adapter="loha", loss_type="l1", keep_tokens=1).values
    (second,) = TrainingOptions.execute(host, options=first, loss_type="huber", huber_c=0.2, flip=False).values
    # the nearer node wins where both set a key; a key left at its default keeps the upstream value
    assert second == {"adapter": "loha", "loss_type": "huber", "keep_tokens": 1, "huber_c": 0.2, "flip": False}
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    config = TrainLoRA.build_config(host, **train_inputs(dataset), options={**second, "rank": 32})
    assert (config.adapter, config.loss_type, config.huber_c, config.flip, config.keep_tokens) == \
        ("loha", "huber", 0.2, False, 1)
    assert config.rank == 4  # Train LoRA's own input wins


def test_training_options_name_the_bad_field(host):
    from comfyui_lora_trainer.nodes.options import TrainingOptions

    with pytest.raises(NodeError, match=r"^loss_type = 'zzz': use one of"):
        TrainingOptions.execute(host, loss_type="zzz")  # V3 combos are not validated by ComfyUI
    with pytest.raises(NodeError, match="^min_bucket_reso"):
        TrainingOptions.execute(host, min_bucket_reso=2048, max_bucket_reso=1024)
    with pytest.raises(NodeError, match="^target_modules"):
        TrainingOptions.execute(host, target="custom")
    with pytest.raises(NodeError, match="^optimizer_args: not valid JSON"):
        TrainingOptions.execute(host, optimizer_args="{betas: [0.9")
    with pytest.raises(NodeError, match="^keep_tokens: 'two' is not a valid int"):
        TrainingOptions.execute(host, keep_tokens="two")
    with pytest.raises(NodeError, match="^network_weights: LoRA 'gone.safetensors' not found"):
        TrainingOptions.execute(host, network_weights="gone.safetensors")
    # a bad upstream value is reported too (the chain is validated as a whole)
    with pytest.raises(NodeError, match="^huber_c"):
        TrainingOptions.execute(host, options={"huber_c": -1.0})
    assert TrainingOptions.execute(host, optimizer_args='{"betas": [0.9, 0.99]}').values[0] == {
        "optimizer_args": {"betas": [0.9, 0.99]}}
    assert TrainingOptions.execute(host, text_encoder_lr=5e-5).values[0] == {"text_encoder_lr": 5e-5}


def test_training_options_continue_from_a_lora_file(host):
    from comfyui_lora_trainer.nodes.options import NONE, TrainingOptions, _lora_files

    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    host.stop_after_steps = 1
    with pytest.raises(InterruptProcessing):  # leaves a state file: never offered as network_weights
        TrainLoRA.execute(host, **train_inputs(dataset, steps=2, output_name="base"))
    host.stop_after_steps = None
    first, _, name, _ = TrainLoRA.execute(host, **train_inputs(dataset, steps=2, output_name="first")).values
    open(os.path.join(host.loras_directory(), "legacy_state_step3.pt"), "wb").close()
    assert _lora_files(host) == [NONE, "base_interrupted_step1.safetensors", "first.safetensors"]
    (options,) = TrainingOptions.execute(host, network_weights=name).values
    assert options == {"network_weights": host.lora_path(name)}
    host.texts.clear()
    TrainLoRA.execute(host, **train_inputs(dataset, steps=1, output_name="second"), options=options)
    assert any("continuing from" in text and name in text for _, text in host.texts)


# Settings the Training Options node leaves out on purpose: paths that would let a graph read or write
# outside ComfyUI's folders, and what the node itself decides (where files go, logging, the device).
NOT_ON_THE_OPTIONS_NODE = {
    "cache_dir": "a free path; the disk cache stays beside the dataset inside the input folder",
    "log_every": "terminal logging; the node shows every step",
    "extra": "not a setting",
}


def test_training_options_cover_every_setting_but_the_listed_ones(host):
    import dataclasses

    from comfyui_lora_trainer.nodes.options import ROWS
    from comfyui_lora_trainer.training.config import TrainConfig

    own = set(TrainLoRA.build_config(host, **train_inputs(LoadDataset.execute(host, folder="shapes").values[0]))
              .to_dict()) - set(ROWS) - set(NOT_ON_THE_OPTIONS_NODE)
    # what is left is set by Train LoRA's own inputs or by the node itself
    assert own == {"checkpoint", "dataset", "steps", "learning_rate", "rank", "alpha", "resolution", "batch_size",
                   "seed", "output_name", "precision", "trigger_word", "overwrite", "gradient_checkpointing",
                   "sample_every_n_steps", "sample_prompts", "save_every_n_steps", "resume_from", "state_dir",
                   "output_dir", "device", "tokenizer"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == own | set(ROWS) | set(NOT_ON_THE_OPTIONS_NODE)


def test_training_options_reg_dataset_family_and_token_length(host):
    from comfyui_lora_trainer.nodes.options import NONE, TrainingOptions, _input_folders

    shutil.copytree(SAMPLE, os.path.join(host.input_directory(), "dogs", "1_dog"))
    assert _input_folders(host) == [NONE, "dogs", "shapes"]
    (options,) = TrainingOptions.execute(host, reg_dataset="dogs", prior_loss_weight=0.5, max_token_length="150",
                                         family="sd1", enable_wildcard=True).values
    assert options == {"reg_dataset": os.path.join(os.path.realpath(host.input_directory()), "dogs"),
                       "prior_loss_weight": 0.5, "max_token_length": 150, "family": "sd1", "enable_wildcard": True}
    assert TrainingOptions.execute(host, reg_dataset=NONE, family="auto", max_token_length="75").values == ({},)
    with pytest.raises(NodeError, match="^reg_dataset: folder '../models': must be a folder inside"):
        TrainingOptions.execute(host, reg_dataset="../models")
    with pytest.raises(NodeError, match="^family = 'sd3'"):
        TrainingOptions.execute(host, family="sd3")
    with pytest.raises(NodeError, match="^max_token_length = 100"):
        TrainingOptions.execute(host, max_token_length="100")
    # the reg folder is trained on: its folder is in the written file's metadata
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    _, _, name, _ = TrainLoRA.execute(host, **train_inputs(dataset, steps=1, output_name="with_reg"),
                                   options=options).values
    from comfyui_lora_trainer.training.formats import load_lora_file

    metadata = load_lora_file(os.path.join(host.loras_directory(), name)).metadata
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 8}}


def test_training_options_save_state_writes_resumable_states_with_save_every(host):
    from comfyui_lora_trainer.nodes.options import TrainingOptions

    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    (options,) = TrainingOptions.execute(host, save_state=True).values
    TrainLoRA.execute(host, **train_inputs(dataset, steps=4, save_every=2, output_name="states"), options=options)
    assert sorted(os.listdir(host.state_directory())) == ["states_state_step2.pt", "states_state_step4.pt"]
    TrainLoRA.execute(host, **train_inputs(dataset, steps=2, save_every=1, output_name="no_states"))
    assert not [n for n in os.listdir(host.state_directory()) if n.startswith("no_states")]
