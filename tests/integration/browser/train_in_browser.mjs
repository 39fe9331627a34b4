// Headless Chromium against a real ComfyUI: load the train_sdxl example workflow, point it at the test's
// tiny checkpoint, queue it, and wait for the Train LoRA node's chart to draw points and a sample image
// to arrive. Prints one JSON line with what it saw; writes a screenshot.
// Usage: node train_in_browser.mjs <server url> <package folder> <checkpoint> <screenshot path>
// Needs playwright-core (resolved through NODE_PATH) and CHROMIUM (path of the browser binary).
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, folder, checkpoint, screenshot] = process.argv.slice(2);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.__loratrainer, null, { timeout: 120_000 });
  // close the first-run template dialog, if it opened, so the screenshot shows the graph
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");
  const queued = await page.evaluate(async ({ folder, checkpoint }) => {
    const response = await fetch(`/api/workflow_templates/${folder}/train_sdxl.json`);
    const workflow = await response.json();
    await window.app.loadGraphData(workflow);
    const set = (node, name, value) => {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${node.type} has no widget ${name}`);
      widget.value = value;
    };
    for (const node of window.app.graph._nodes) {
      if (node.type === "LoraTrainer_LoadDataset") {
        set(node, "folder", "my_dataset");
        set(node, "resolution", 64);
      }
      if (node.type === "LoraTrainer_TrainLoRA") {
        for (const [k, v] of Object.entries({ checkpoint, steps: 6, resolution: 64, rank: 4, precision: "fp32",
          sample_every: 2, save_every: 0, output_name: "browser_lora", overwrite: true })) set(node, k, v);
      }
    }
    await window.app.queuePrompt(0, 1);
    const train = window.app.graph._nodes.find((n) => n.type === "LoraTrainer_TrainLoRA");
    return String(train.id);
  }, { folder, checkpoint });
  // the chart draws points (canvas data-points) and a sample <img> loads
  await page.waitForFunction((id) => {
    const run = window.__loratrainer.runs.get(id);
    const panel = window.__loratrainer.panels.get(id);
    const img = panel?.samples.querySelector("img.loratrainer-sample");
    return run && run.losses.length >= 2 && Number(panel.canvas.dataset.points) >= 2 && img?.complete && img.naturalWidth > 0;
  }, queued, { timeout: 480_000, polling: 250 });
  const seen = await page.evaluate((id) => {
    const run = window.__loratrainer.runs.get(id);
    const panel = window.__loratrainer.panels.get(id);
    return { node: id, points: Number(panel.canvas.dataset.points), losses: run.losses, samples: run.samples.length,
      status: panel.status.textContent, sampleWidth: panel.samples.querySelector("img").naturalWidth };
  }, queued);
  await page.keyboard.press("Escape");
  await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(Number(id));
    window.app.canvas.ds.scale = 1;
    window.app.canvas.centerOnNode?.(node);
    window.app.canvas.setDirty(true, true);
  }, queued);
  await page.waitForTimeout(500);
  await page.screenshot({ path: screenshot, fullPage: false });
  console.log(JSON.stringify({ ok: true, ...seen, errors }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e), errors }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
