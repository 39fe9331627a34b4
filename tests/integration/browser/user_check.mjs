// A user's check in headless Chromium against a real ComfyUI (see test_ui_browser.py, which asserts on what this
// prints). Steps:
//   1. every example workflow, loaded as the template browser loads it: what the frontend reports (missing node
//      types, toasts, dialogs and error panels), its links and required inputs, node rectangles, a screenshot;
//   2. a training queued with the real Run button: chart points and a sample image arrive;
//   3. a second, longer training stopped with the real Cancel button: the _interrupted_ LoRA appears in the
//      LoRA list of an Apply LoRA node already on the canvas;
//   4. a second workflow loaded afterwards: its Train LoRA node shows no run;
//   5. train_flux with its three loaders swapped (through the graph API) for the tiny Flux ones of the test-only
//      tiny_loaders pack (or Load Diffusion Model kept, on the tiny file, where this ComfyUI reads its sizes),
//      queued with the real Run button: the training's chart and sample arrive and the whole prompt finishes.
// Usage: node user_check.mjs '<json: {url, folder, examples, checkpoint, outDir, flux: {unet, modelNode}}>'
// Prints one JSON line (prefixed RESULT) with everything seen. Needs playwright-core on NODE_PATH and CHROMIUM.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const cfg = JSON.parse(process.argv[2]);
const TRAIN = "LoraTrainer_TrainLoRA";

const result = { ok: false, examples: {}, consoleErrors: [], pageErrors: [], failedRequests: [], steps: [] };
const log = (step) => {
  result.steps.push(step);
  console.error(`[user_check] ${step}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
page.on("console", (m) => {
  if (m.type() === "error") result.consoleErrors.push({ text: m.text(), url: m.location()?.url || "" });
});
page.on("pageerror", (e) => result.pageErrors.push(String(e.stack || e)));
page.on("response", (r) => {
  if (r.status() >= 400) result.failedRequests.push(`${r.status()} ${r.url()}`);
});

/** Close whatever dialog or toast is open (first-run template browser, earlier messages). */
async function dismiss() {
  for (let i = 0; i < 3; i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(150);
  }
  await page.evaluate(() => {
    for (const b of document.querySelectorAll(".p-toast-close-button, .p-toast-icon-close")) b.click();
  });
}

/** Load an example as the template browser does (fetch from /api/workflow_templates, app.loadGraphData). */
async function loadExample(name) {
  await page.evaluate(
    async ({ folder, name }) => {
      const response = await fetch(`/api/workflow_templates/${folder}/${name}.json`);
      if (!response.ok) throw new Error(`template ${name}: HTTP ${response.status}`);
      await window.app.loadGraphData(await response.json(), true, true, name);
    },
    { folder: cfg.folder, name },
  );
  await page.waitForTimeout(2500); // missing-model scans and size computations run after load
}

/** What the frontend shows after a load, and the graph's own state. */
async function inspectGraph() {
  return page.evaluate(() => {
    const { app, LiteGraph } = window;
    const graph = app.graph;
    const nodes = graph._nodes ?? graph.nodes;
    const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const texts = (selector) =>
      [...document.querySelectorAll(selector)].filter(visible).map((el) => el.innerText.trim()).filter(Boolean);
    const linkList = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
    const byId = new Map(nodes.map((n) => [n.id, n]));
    const badLinks = [];
    for (const link of linkList) {
      if (!link) continue;
      const from = byId.get(link.origin_id);
      const to = byId.get(link.target_id);
      const out = from?.outputs?.[link.origin_slot];
      const input = to?.inputs?.[link.target_slot];
      const fits = out && input && (out.type === input.type || LiteGraph.isValidConnection?.(out.type, input.type));
      if (!fits || input.link !== link.id) {
        badLinks.push({ id: link.id, from: from?.type, out: out?.type, to: to?.type, input: input?.name, inputType: input?.type });
      }
    }
    const unconnected = [];
    for (const node of nodes) {
      const required = node.constructor?.nodeData?.input?.required ?? {};
      for (const input of node.inputs ?? []) {
        if (input.link == null && !input.widget && input.name in required) {
          unconnected.push({ node: node.id, type: node.type, input: input.name });
        }
      }
    }
    const TITLE = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const rects = nodes.map((n) => ({
      id: n.id, type: n.type, x: n.pos[0], y: n.pos[1] - TITLE, w: n.size[0], h: n.size[1] + TITLE,
    }));
    return {
      graphId: graph.id ? String(graph.id) : null,
      missingTypes: nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
      nodesWithErrors: nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`),
      toasts: texts(".p-toast-message"),
      dialogs: texts(".p-dialog"),
      // 1.49's error summary ("N errors found") and its missing-model panel
      errorPanels: texts("[class*='error' i], [class*='missing' i], [data-testid*='error' i], [data-testid*='missing' i]")
        .filter((t) => t.length < 2000),
      badLinks,
      unconnected,
      rects,
    };
  });
}

/** The missing-model report as the user reads it (1.49: behind "View details"; 1.27: the load dialog): its
 * lines about model files and model types. */
async function modelPanel() {
  const details = page.getByRole("button", { name: "View details" }).first();
  if (await details.isVisible().catch(() => false)) {
    await details.click();
    await page.waitForTimeout(1000);
  }
  const lines = await page.evaluate(() =>
    document.body.innerText.split("\n").map((l) => l.trim()).filter((l) => /safetensors|checkpoints|diffusion_models|text_encoders|\bvae\b|unknown/i.test(l)),
  );
  await page.screenshot({ path: path.join(cfg.outDir, `models-${result.steps.length}.png`) });
  return lines;
}

/** Fit every node into the viewport and save a screenshot. */
async function screenshot(file) {
  await page.evaluate(() => {
    const { app } = window;
    const nodes = app.graph._nodes ?? app.graph.nodes;
    const TITLE = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - TITLE);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const canvas = app.canvas;
    const width = canvas.canvas.clientWidth || canvas.canvas.width;
    const height = canvas.canvas.clientHeight || canvas.canvas.height;
    // margins: the side bar (left), the tab and action bars (top) lie over the canvas
    const [left, top, right, bottom] = [90, 110, 30, 100];
    // draw text at any zoom (LiteGraph draws bare boxes where the font would be smaller than this)
    if ("min_font_size_for_lod" in canvas) canvas.min_font_size_for_lod = 0;
    const scale = Math.min((width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0), 1.2);
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = -x0 + (left + (width - left - right - (x1 - x0) * scale) / 2) / scale;
    canvas.ds.offset[1] = -y0 + (top + (height - top - bottom - (y1 - y0) * scale) / 2) / scale;
    canvas.setDirty(true, true);
  });
  await page.waitForTimeout(700);
  await page.screenshot({ path: file });
  return file;
}

function setWidgets(values) {
  return page.evaluate(
    ({ values, TRAIN }) => {
      const nodes = window.app.graph._nodes ?? window.app.graph.nodes;
      for (const node of nodes) {
        const wanted = values[node.type] ?? {};
        for (const [name, value] of Object.entries(wanted)) {
          const widget = node.widgets?.find((w) => w.name === name);
          if (!widget) throw new Error(`${node.type} has no widget ${name}`);
          widget.value = value;
        }
      }
      return String(nodes.find((n) => n.type === TRAIN).id);
    },
    { values, TRAIN },
  );
}

/** Replace each loader of train_flux by the tiny one (same place, same outgoing links), through the graph API. */
function swapLoaders({ unet, modelNode }) {
  return page.evaluate(
    ({ unet, modelNode }) => {
      const { app, LiteGraph } = window;
      const graph = app.graph;
      const nodes = () => graph._nodes ?? graph.nodes;
      const linkById = (id) => (graph.links instanceof Map ? graph.links.get(id) : graph.links[id]);
      const swap = (type, newType, widgets) => {
        const old = nodes().find((n) => n.type === type);
        if (!old) throw new Error(`train_flux has no ${type}`);
        const node = LiteGraph.createNode(newType);
        if (!node) throw new Error(`node type ${newType} is not registered (tiny_loaders pack missing?)`);
        node.pos = [...old.pos];
        graph.add(node);
        for (const [name, value] of Object.entries(widgets)) node.widgets.find((w) => w.name === name).value = value;
        const targets = (old.outputs[0].links ?? []).map(linkById).map((l) => [l.target_id, l.target_slot]);
        for (const [id, slot] of targets) node.connect(0, graph.getNodeById(id), slot);
        graph.remove(old);
      };
      if (modelNode === "UNETLoader") {
        nodes().find((n) => n.type === "UNETLoader").widgets.find((w) => w.name === "unet_name").value = unet;
      } else {
        swap("UNETLoader", modelNode, { unet_name: unet });
      }
      swap("DualCLIPLoader", "ITTinyFluxClip", {});
      swap("VAELoader", "ITTinyFluxVae", {});
      app.canvas.setDirty(true, true);
    },
    { unet, modelNode },
  );
}

const widgetOf = (id, name) =>
  page.evaluate(({ id, name }) => window.app.graph.getNodeById(Number(id)).widgets.find((w) => w.name === name).value, { id, name });

/** Once the queue is empty: the newest prompt's status and the nodes that gave outputs (from /history). */
async function lastPrompt(timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const seen = await page.evaluate(async () => {
      const queue = await (await fetch("/queue")).json();
      if (queue.queue_running.length || queue.queue_pending.length) return null;
      const history = await (await fetch("/history?max_items=1")).json();
      const entry = Object.values(history)[0];
      return { status: entry?.status?.status_str ?? null, outputs: Object.keys(entry?.outputs ?? {}) };
    });
    if (seen) return seen;
    if (Date.now() > deadline) throw new Error(`the prompt is still queued or running after ${timeout} ms`);
    await page.waitForTimeout(500);
  }
}

async function clickRun() {
  const candidates = [page.getByTestId("queue-button"), page.getByRole("button", { name: /^Run$/ })];
  for (const locator of candidates) {
    const first = locator.first();
    if (await first.isVisible().catch(() => false)) {
      await first.click();
      return;
    }
  }
  throw new Error("no Run button found");
}

/** The real Cancel button of the running job (next to Run: "Cancel current run" in 1.27 and 1.49). */
async function clickCancel() {
  const button = page.locator("button[aria-label='Cancel current run']:visible").first();
  await button.waitFor({ state: "visible", timeout: 30_000 });
  const deadline = Date.now() + 30_000;
  while (await button.isDisabled()) {
    if (Date.now() > deadline) throw new Error("Cancel current run stays disabled while a run is going");
    await page.waitForTimeout(250);
  }
  await button.click();
  return "Cancel current run";
}

const runOf = (id) =>
  page.evaluate((id) => {
    const run = window.__loratrainer.runFor(id);
    const panel = window.__loratrainer.panels.get(id);
    const img = panel?.samples.querySelector("img.loratrainer-sample");
    return {
      status: run?.status ?? null, losses: run?.losses?.length ?? 0, samples: run?.samples?.length ?? 0,
      points: Number(panel?.canvas.dataset.points ?? 0), panelStatus: panel?.status.textContent ?? null,
      sampleWidth: img?.complete ? img.naturalWidth : 0,
    };
  }, id);

async function waitRun(id, done, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const seen = await runOf(id);
    if (done(seen)) return seen;
    if (Date.now() > deadline) throw new Error(`run on node ${id} not there after ${timeout} ms: ${JSON.stringify(seen)}`);
    await page.waitForTimeout(500);
  }
}

const TINY = (name, steps, sampleEvery) => ({
  LoraTrainer_LoadDataset: { resolution: 64 },
  [TRAIN]: {
    checkpoint: cfg.checkpoint, steps, resolution: 64, rank: 4, precision: "fp32", gradient_checkpointing: false,
    sample_every: sampleEvery, save_every: 0, output_name: name, overwrite: true,
  },
});

async function openPage() {
  await page.goto(cfg.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.__loratrainer && window.app?.canvas && window.LiteGraph, null, { timeout: 180_000 });
  await page.waitForTimeout(2000);
  await dismiss();
}

try {
  await openPage();
  result.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  // 1. every example as a user opens it, each in a fresh page (the error panel opened for one stays open)
  for (const name of cfg.examples) {
    log(`load ${name}`);
    await openPage();
    await loadExample(name);
    const seen = await inspectGraph();
    if (cfg.examplesOnly) {
      // for thumbnails: the graph alone, without the load dialog, toasts and the minimap
      await dismiss();
      await page.addStyleTag({ content: ".p-toast, .p-dialog-mask, [class*='minimap' i] { display: none !important; }" });
    }
    seen.screenshot = await screenshot(path.join(cfg.outDir, `${name}.png`));
    seen.modelPanel = await modelPanel();
    result.examples[name] = seen;
  }

  // steps 2-4 (with examplesOnly, step 1 alone: make_example_workflows.py's thumbnails)
  if (!cfg.examplesOnly) {
    // 2. a training queued with the Run button
    log("run train_sdxl with the Run button");
    await openPage();
    await loadExample("train_sdxl");
    const trainId = await setWidgets(TINY("browser_lora", 6, 2));
    await dismiss();
    await clickRun();
    result.run = await waitRun(trainId, (s) => s.status === "done" && s.points >= 2 && s.sampleWidth > 0, 480_000);
    result.runGraph = await page.evaluate(() => String(window.app.graph.id));
    result.runRects = (await inspectGraph()).rects; // nodes that grew with their results (Load Dataset's report)
    await screenshot(path.join(cfg.outDir, "run_train_sdxl.png"));

    // 3. a longer training stopped with the Cancel button; the LoRA list of an Apply LoRA node on the canvas updates
    log("second run, cancelled");
    const applyId = await page.evaluate(() => {
      const node = window.LiteGraph.createNode("LoraTrainer_ApplyLoRA");
      node.pos = [40, 2400];
      window.app.graph.add(node);
      return node.id;
    });
    await setWidgets(TINY("browser_cancel", 400, 0));
    await clickRun();
    await waitRun(trainId, (s) => s.status === "running" && s.losses >= 2, 300_000);
    result.cancelButton = await clickCancel();
    result.cancelled = await waitRun(trainId, (s) => s.status === "interrupted", 120_000);
    const deadline = Date.now() + 30_000;
    for (;;) {
      result.loraList = await page.evaluate((id) => {
        const node = window.app.graph.getNodeById(id);
        const widget = node.widgets.find((w) => w.name === "lora_name");
        const values = widget.options.values;
        return typeof values === "function" ? values() : values;
      }, applyId);
      if (result.loraList.some((n) => n.includes("browser_cancel_interrupted_")) || Date.now() > deadline) break;
      await page.waitForTimeout(500);
    }

    // 4. another workflow: its Train LoRA (node 3 as well) shows no run
    log("load a second workflow");
    await dismiss();
    await loadExample("train_and_test_sd15");
    await page.waitForTimeout(1000);
    const other = await page.evaluate(() => String((window.app.graph._nodes ?? window.app.graph.nodes).find((n) => n.type === "LoraTrainer_TrainLoRA").id));
    result.secondWorkflow = { node: other, graphId: await page.evaluate(() => String(window.app.graph.id)), ...(await runOf(other)) };
    await screenshot(path.join(cfg.outDir, "second_workflow.png"));

    if (cfg.flux) {
      log("run train_flux on the tiny Flux loaders with the Run button");
      await openPage();
      await loadExample("train_flux");
      await swapLoaders(cfg.flux);
      const fluxId = await setWidgets({
        LoraTrainer_LoadDataset: { resolution: 64 },
        [TRAIN]: {
          steps: 4, resolution: 64, rank: 4, precision: "fp32", gradient_checkpointing: false, sample_every: 2,
          save_every: 0, output_name: "browser_flux", overwrite: true,
        },
        EmptySD3LatentImage: { width: 64, height: 64 },
        KSampler: { steps: 2 },
      });
      const graph = await inspectGraph();
      await dismiss();
      await clickRun();
      const run = await waitRun(fluxId, (s) => s.status === "done" && s.points >= 2 && s.sampleWidth > 0, 300_000);
      result.flux = { ...run, checkpoint: await widgetOf(fluxId, "checkpoint"), graph, prompt: await lastPrompt(120_000) };
      await screenshot(path.join(cfg.outDir, "run_train_flux.png"));
    }
  }
  result.ok = true;
} catch (e) {
  result.error = String(e.stack || e);
  await page.screenshot({ path: path.join(cfg.outDir, "failure.png") }).catch(() => {});
} finally {
  await browser.close();
  console.log("RESULT " + JSON.stringify(result));
}
