"""TrainConfig's field descriptions drive the docs, the node widgets and validate(): they cannot drift apart."""

import dataclasses
import math

import pytest

from comfyui_lora_trainer.nodes.options import TABLE
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training import config_docs
from comfyui_lora_trainer.training.config import GROUPS, ConfigError, TrainConfig, field_problem

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
NODE_NAMES = {"sample_every": "sample_every_n_steps", "save_every": "save_every_n_steps"}  # Train LoRA's names


def config_widgets():
    """(node, key, In) for every widget that stands for a TrainConfig key."""
    for row in TABLE:
        yield "TrainingOptions", row.key, row.input
    for i in TrainLoRA.inputs:
        key = NODE_NAMES.get(i.name, i.name)
        if key in FIELDS:
            yield "TrainLoRA", key, i


def test_the_docs_tables_are_the_ones_the_fields_render():
    with open(config_docs.DOC, encoding="utf-8") as f:
        text = f.read()
    assert config_docs.current_block(text) == config_docs.generated_block(), (
        "docs/configuration.md is out of date with training/config.py; refresh it with "
        "`python -m comfyui_lora_trainer.training.config_docs`"
    )


def test_the_docs_check_command_reports_drift(tmp_path):
    with open(config_docs.DOC, encoding="utf-8") as f:
        text = f.read()
    stale = tmp_path / "configuration.md"
    stale.write_text(text.replace("| `rank` | 16 |", "| `rank` | 8 |"), encoding="utf-8")
    assert config_docs.main(["--check", "--path", str(stale)]) == 1
    assert config_docs.main(["--path", str(stale)]) == 0  # refreshes the tables, keeps the prose
    assert stale.read_text(encoding="utf-8") == text
    assert config_docs.main(["--check", "--path", str(stale)]) == 0


def test_every_field_describes_itself():
    for name, f in FIELDS.items():
        meta = f.metadata
        assert meta.get("help") and meta.get("doc"), f"{name}: no help text"
        assert meta["group"] in GROUPS, name
        if "choices" in meta:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert default in meta["choices"] or (default is None and meta["optional"]), name


def accepts(key, value) -> bool:
    try:
        TrainConfig(checkpoint="c", dataset="d", **{key: value}).validate()
    except ConfigError as e:
        assert str(e).startswith(f"{key} = ")
        return False
    return True


@pytest.mark.parametrize("node,key,widget", list(config_widgets()), ids=lambda v: v if isinstance(v, str) else "")
def test_node_widgets_offer_only_what_the_config_accepts(node, key, widget):
    f = FIELDS[key]
    meta = f.metadata
    if widget.kind in ("INT", "FLOAT"):
        for bound in ("min", "max"):
            value = getattr(widget, bound)
            if value is None or abs(value) > 2**53:
                continue
            problem = field_problem(f, value)  # the field's own rule (other keys' rules aside)
            assert problem is None, f"{node}.{widget.name}: the widget's {bound} {value} is refused: {problem}"
        # where the config has an inclusive bound and the widget does not narrow it, they are the same number
        narrowed = meta.get("widget", {})
        for bound in ("min", "max"):
            if bound in meta and bound not in narrowed:
                assert getattr(widget, bound) == meta[bound], f"{node}.{widget.name} {bound}"
    if widget.kind == "COMBO" and "choices" in meta and not callable(widget.options):
        offered = [o for o in widget.options if o not in ("auto", "none")]
        numeric = any(isinstance(c, int) for c in meta["choices"])  # the widget offers numbers as text
        coerced = [int(o) if numeric and o.isdigit() else o for o in offered]
        for value in coerced:  # each one passes the field's own rule (its choices, or what else it accepts)
            assert field_problem(f, value) is None, f"{node}.{widget.name}: {value!r}"


def test_rank_ranges_agree_on_the_node_and_in_the_config():
    rank = next(i for i in TrainLoRA.inputs if i.name == "rank")
    assert (rank.min, rank.max) == (1, 1024)
    assert accepts("rank", 1024) and not accepts("rank", 1025) and not accepts("rank", 0)


def test_option_tooltips_are_the_fields_help():
    for row in TABLE:
        assert row.input.tooltip == FIELDS[row.key].metadata["help"], row.key


@pytest.mark.parametrize("key,value,message", [
    ("rank", 0, "rank = 0: use a whole number from 1 to 1024"),
    ("learning_rate", 0.0, "learning_rate = 0.0: use a number above 0 and below 1 (1e-4 is a common start)"),
    ("resolution", 65, "resolution = 65: use a multiple of 8 from 64 to 4096"),
    ("network_dropout", 1.0, "network_dropout = 1.0: use a number from 0 to below 1"),
    ("loss_type", "l3", "loss_type = 'l3': use one of mse, l1, huber, smooth_l1"),
    ("max_timestep", 1001, "max_timestep = 1001: use a whole number of at most 1000"),
    ("steps", "ten", "steps = 'ten': use a whole number of at least 1"),
    ("alpha", math.inf, "alpha = inf: use a number above 0"),
])
def test_refusals_say_the_range_from_the_field(key, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(checkpoint="c", dataset="d", **{key: value}).validate()
    assert str(e.value).startswith(message)


def test_optional_fields_accept_none_and_their_range():
    assert accepts("text_encoder_lr", None) and accepts("text_encoder_lr", 0.0)
    assert not accepts("text_encoder_lr", 1.0)
    assert accepts("family", None) and accepts("family", "sdxl") and not accepts("family", "sd3")
