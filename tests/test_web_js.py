"""The frontend extension's JavaScript tests (node --test, no dependencies) under the one pytest command."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (the JS unit tests need Node.js 18+)")


@needs_node
def test_js_unit_tests_pass():
    result = subprocess.run([NODE, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass " in result.stdout


@needs_node
@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "web")) if f.endswith(".js")))
def test_extension_files_parse_as_modules(name):
    result = subprocess.run([NODE, "--experimental-default-type=module", "--check", os.path.join(ROOT, "web", name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_web_folder_holds_only_what_the_browser_should_load():
    # ComfyUI imports every .js under WEB_DIRECTORY as an extension: no tests or node-only code there
    for dirpath, _, files in os.walk(os.path.join(ROOT, "web")):
        for name in files:
            if name.endswith(".js"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
                assert "from \"node:" not in text and ".test." not in name, name


def test_message_names_match_the_server():
    from comfyui_lora_trainer.nodes import train

    with open(os.path.join(ROOT, "web", "lora_trainer.js"), encoding="utf-8") as f:
        text = f.read()
    for event in (train.RUN_EVENT, train.PROGRESS_EVENT, train.SAMPLE_EVENT, train.SAVED_EVENT):
        assert f'"{event}"' in text, event
    assert '"/loratrainer/runs"' in text and train.TrainLoRA.node_id in text
