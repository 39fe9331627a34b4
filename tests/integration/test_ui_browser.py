"""A user's check in the real frontend: headless Chromium (Debian's chromium + npm's playwright-core) against a
real ComfyUI serving comfyui-frontend-package and this package; browser/user_check.mjs drives the page.

For every example workflow, loaded as the template browser loads it: no error but the model files the user has
not downloaded (each filed under its folder, "checkpoints", "diffusion_models", "text_encoders", "vae", with its
download), no missing node type, no console error from the package, every link joins matching types and every
required input is connected, no two nodes overlap, and its thumbnail is served. Then a training queued with the
real Run button draws its chart and a sample; a second one stopped with the real Cancel button puts its
_interrupted_ LoRA into the LoRA list; a workflow loaded afterwards shows no run on its Train LoRA node (node ids
repeat across workflows). Last, train_flux with its loaders swapped for the test-only tiny Flux ones
(tiny_loaders/) trains from the graph's MODEL with the Run button, and its sampling branch runs.

Screenshots (one per example, and of the run) go to $TEST_ARTIFACTS/browser-<frontend> or, without it, to
<pytest basetemp>/browser-artifacts; the folder is printed.

Setup (.ci/run does all of it):
    apt-get install -y chromium                      # Debian 12: /usr/bin/chromium (or set CHROMIUM)
    mkdir -p ~/pw && cd ~/pw && npm init -y && npm install playwright-core
    export LORATRAINER_PLAYWRIGHT=~/pw/node_modules   # or put playwright-core on NODE_PATH
    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/integration/test_ui_browser.py -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import pytest
from make_example_workflows import MODEL_WIDGETS, MODELS  # the model files the examples name, their downloads

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted(p.stem for p in (HERE.parents[1] / "example_workflows").glob("*.json"))
MODEL_NODES = set(MODEL_WIDGETS)  # the nodes that name a model file (a missing one is their error)
# where the package's code runs in the page: its extension files (and their stack frames). The frontend's own
# lookups of our node types in the registry (blocked offline) are not the package's errors.
PACKAGE_CODE = "/extensions/comfyui-lora-trainer/"
# what the error panels show besides the missing checkpoint: headings and buttons
PANEL_LABELS = {"errors", "view details", "download", "download all", "resolve them before running the workflow."}


def _playwright_dir() -> str | None:
    candidates = [os.environ.get("LORATRAINER_PLAYWRIGHT"), *os.environ.get("NODE_PATH", "").split(os.pathsep)]
    for c in candidates:
        if c and (Path(c) / "playwright-core" / "package.json").is_file():
            return c
    return None


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _requirements() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not _chromium():
        return "no chromium binary (apt-get install chromium, or set CHROMIUM)"
    if _playwright_dir() is None:
        return "playwright-core not found (npm install playwright-core; set LORATRAINER_PLAYWRIGHT to its node_modules)"
    return None


def overlaps(rects: list[dict]) -> list[tuple]:
    """Pairs of node rectangles (title bar included) that intersect."""
    found = []
    for a, b in combinations(rects, 2):
        if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]:
            found.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return found


@pytest.fixture(scope="module")
def seen(comfy, comfy_base_dir, comfy_lib, tmp_path_factory):
    missing = _requirements()
    if missing:
        pytest.skip(f"browser test needs chromium + playwright-core: {missing}")
    import tiny_loaders

    from comfyui_lora_trainer.training.models import write_tiny_checkpoint

    checkpoint = "tiny-sdxl-browser.safetensors"
    write_tiny_checkpoint(str(comfy_base_dir / "models" / "checkpoints" / checkpoint), family="sdxl", seed=0)
    templates = comfy.get_json("/api/workflow_templates")
    folder = next(k for k, names in templates.items() if "train_sdxl" in names)
    root = Path(os.environ["TEST_ARTIFACTS"]) if os.environ.get("TEST_ARTIFACTS") else \
        tmp_path_factory.getbasetemp() / "browser-artifacts"
    out = root / f"browser-{Path(str(comfy.server.comfyui_dir)).name}"
    out.mkdir(parents=True, exist_ok=True)
    # train_flux's run: Load Diffusion Model on the tiny file where this ComfyUI reads its sizes, else the test node
    unet = tiny_loaders.write_tiny_flux(comfy_base_dir / "models" / "diffusion_models")
    flux = dict(unet=unet, modelNode="UNETLoader" if tiny_loaders.unet_loader_reads_tiny_flux() else "ITTinyFluxModel")
    plan = dict(url=comfy.url, folder=folder, examples=EXAMPLES, checkpoint=checkpoint, outDir=str(out), flux=flux)
    env = dict(os.environ, NODE_PATH=_playwright_dir(), CHROMIUM=_chromium())
    proc = subprocess.run(["node", str(HERE / "browser" / "user_check.mjs"), json.dumps(plan)],
                          capture_output=True, text=True, timeout=1500, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    result["folder"] = folder
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"\n[browser] frontend {result.get('frontend')}: screenshots in {out}: "
          f"{sorted(p.name for p in out.glob('*.png'))}")
    assert result["ok"], f"{result.get('error')}\nsteps: {result['steps']}\nscreenshots: {out}"
    return result


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_clean(seen, name, comfy):
    page = seen["examples"][name]
    assert page["missingTypes"] == []
    assert page["badLinks"] == [], "a link joins mismatched types or points nowhere"
    assert page["unconnected"] == [], "a required input has no link"
    assert overlaps(page["rects"]) == [], "nodes overlap after load"
    # the only errors: the model files the user has not downloaded, on the nodes that name them
    kinds = {f"{r['id']} {r['type']}": r["type"] for r in page["rects"]}
    assert all(kinds[n] in MODEL_NODES for n in page["nodesWithErrors"]), page["nodesWithErrors"]
    workflow = json.loads((HERE.parents[1] / "example_workflows" / f"{name}.json").read_text())
    files = {(m["directory"], m["name"]) for n in workflow["nodes"] for m in n["properties"].get("models", [])}
    for text in page["toasts"] + page["dialogs"] + page["errorPanels"]:
        # the panel names the missing model (0.33) or files the checkpoint under its folder (0.3.64's dialog:
        # "checkpoints / <file> / Download"); with several files, 0.33's summary counts them ("4 errors found",
        # its details list the files: modelPanel below)
        summary = re.match(r"(\d+) errors? found\b", text.strip().lower())
        assert ("model" in text.lower() or any(f in text for f in MODELS) or text.strip().lower() in PANEL_LABELS
                or (summary is not None and int(summary.group(1)) == len(files))), text
    # the missing-model report files each model under its folder (not "Unknown") and offers its download
    for folder, file in files:
        assert folder in page["modelPanel"] or any(f"{folder} /" in line for line in page["modelPanel"]), \
            (folder, page["modelPanel"])
        assert any(file in line for line in page["modelPanel"]), (file, page["modelPanel"])
    assert not [line for line in page["modelPanel"] if "unknown" in line.lower()], page["modelPanel"]
    assert Path(page["screenshot"]).stat().st_size > 10_000
    thumbnail = comfy.get_bytes(f"/api/workflow_templates/{seen['folder']}/{name}.jpg")
    assert thumbnail[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"


def test_no_console_errors_from_the_package(seen):
    assert [e for e in seen["consoleErrors"] if PACKAGE_CODE in e["text"] + e["url"]] == []
    assert [e for e in seen["pageErrors"] if PACKAGE_CODE in e] == []
    # the extension's files and the templates' files (workflows, thumbnails) are all served
    assert [r for r in seen["failedRequests"] if PACKAGE_CODE in r or "/workflow_templates/comfyui-lora-trainer" in r] == []


def test_run_button_trains_and_the_node_draws(seen):
    run = seen["run"]
    assert run["status"] == "done" and run["points"] >= 2 and run["losses"] >= 2
    assert run["samples"] >= 1 and run["sampleWidth"] > 0
    assert "step" in run["panelStatus"]
    assert overlaps(seen["runRects"]) == [], "nodes overlap once they show their results"


def test_cancel_button_stops_and_the_lora_list_shows_the_interrupted_file(seen, comfy_base_dir):
    assert seen["cancelButton"] == "Cancel current run"
    assert seen["cancelled"]["status"] == "interrupted"
    interrupted = [n for n in seen["loraList"] if "browser_cancel_interrupted_" in n]
    assert interrupted, seen["loraList"]
    assert (comfy_base_dir / "models" / "loras" / interrupted[0]).is_file()


def test_a_second_workflow_shows_no_foreign_run(seen):
    other = seen["secondWorkflow"]
    assert other["graphId"] != seen["runGraph"]
    assert other["status"] is None and other["points"] == 0 and other["panelStatus"] == "not trained yet"


def test_run_button_trains_flux_from_the_graphs_loaders(seen, comfy_base_dir):
    """train_flux with the tiny Flux loaders swapped in through the graph API: still a clean graph, Train LoRA
    on "(model input)" trains, draws its chart and a sample, and the whole prompt (Apply LoRA, the Flux
    sampling branch, Save Image) finishes."""
    from safetensors import safe_open

    flux = seen["flux"]
    graph = flux["graph"]
    assert graph["missingTypes"] == [] and graph["badLinks"] == [] and graph["unconnected"] == []
    assert flux["checkpoint"] == "(model input)"
    assert flux["status"] == "done" and flux["points"] >= 2 and flux["losses"] == 4
    assert flux["samples"] >= 1 and flux["sampleWidth"] > 0
    assert flux["prompt"]["status"] == "success"
    assert "15" in flux["prompt"]["outputs"], flux["prompt"]  # Save Image after Apply LoRA and the sampler
    with safe_open(str(comfy_base_dir / "models" / "loras" / "browser_flux.safetensors"), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev/lora"
