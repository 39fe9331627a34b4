// Frontend extension for comfyui-lora-trainer.
// - Train LoRA nodes get a live panel: loss chart (raw + smoothed, and the validation loss), step/total, speed, ETA, the estimate,
//   and the latest sample images, fed by the server's loratrainer.* messages. A reloaded page re-draws
//   it from the server's run records (GET /loratrainer/runs, /loratrainer/runs/{id}).
// - Every LoRA list refreshes when a LoRA file is written (ComfyUI fetches the lists once per page).
// - Load Dataset nodes show their report text.
// Without this extension the stock frontend still shows the progress bar, the preview image (latest
// sample or loss chart) and a status line: the server sends those through ComfyUI's own messages.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { RunState, layout, viewPath, formatDuration } from "./loss_chart.js";

export const EVENTS = {
  run: "loratrainer.run",
  progress: "loratrainer.progress",
  sample: "loratrainer.sample",
  saved: "loratrainer.saved",
  validation: "loratrainer.validation", // {step, loss}: one validation measurement (issue 15)
};
const TRAIN_NODE = "LoraTrainer_TrainLoRA";
const DATASET_NODE = "LoraTrainer_LoadDataset";

// A run belongs to a node of one workflow: node ids repeat across workflows (every example's Train LoRA is
// node 3), so runs are keyed by the workflow that queued their prompt and the node id. The frontend tells us
// which workflow queued which prompt (api.queuePrompt below); kept in localStorage so a reloaded page, or a
// second tab, still matches the server's run records.
const runs = new Map(); // runKey(workflow, node) -> RunState
const panels = new Map(); // node id (string) -> panel of that node in the graph shown now
const PROMPTS_KEY = "loratrainer.promptWorkflows";
const MAX_PROMPTS = 200;
const promptWorkflows = new Map(loadPromptWorkflows()); // prompt id -> workflow id

function loadPromptWorkflows() {
  try {
    const entries = JSON.parse(window.localStorage?.getItem(PROMPTS_KEY) || "[]");
    return Array.isArray(entries) ? entries.filter((e) => Array.isArray(e) && e.length === 2) : [];
  } catch {
    return [];
  }
}

function rememberPrompt(promptId, workflowId) {
  if (!promptId || !workflowId) return;
  promptWorkflows.set(String(promptId), String(workflowId));
  while (promptWorkflows.size > MAX_PROMPTS) promptWorkflows.delete(promptWorkflows.keys().next().value);
  try {
    window.localStorage?.setItem(PROMPTS_KEY, JSON.stringify([...promptWorkflows]));
  } catch {
    /* storage full or disabled: matching still works until the page reloads */
  }
}

/** The workflow shown now: the graph's id (a uuid every saved workflow carries). */
function currentWorkflow() {
  const id = app.graph?.id;
  return id ? String(id) : null;
}

function runKey(workflowId, nodeId) {
  return `${workflowId}|${nodeId}`;
}

/** The key of a server run: its prompt's workflow, when this browser queued it; otherwise it matches no node. */
function keyOfRun(promptId, nodeId) {
  return runKey(promptWorkflows.get(String(promptId)) ?? `prompt:${promptId}`, nodeId);
}

/** The run shown on node ``nodeId`` of the workflow shown now, if any. */
function runFor(nodeId) {
  const workflow = currentWorkflow();
  return workflow ? runs.get(runKey(workflow, nodeId)) : undefined;
}

// for tests and for curious users: window.__loratrainer.runFor("<node id>")
window.__loratrainer = { runs, panels, runFor, promptWorkflows };

// Remember which workflow each queued prompt came from (the Run button and app.queuePrompt both end here).
const queuePrompt = api.queuePrompt;
api.queuePrompt = async function (number, data, ...rest) {
  const response = await queuePrompt.call(this, number, data, ...rest);
  rememberPrompt(response?.prompt_id, data?.workflow?.id ?? currentWorkflow());
  return response;
};

function css(el, styles) {
  Object.assign(el.style, styles);
  return el;
}

function makePanel(node) {
  const root = css(document.createElement("div"), {
    display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
    boxSizing: "border-box", padding: "2px", font: "11px sans-serif", color: "var(--input-text, #ddd)",
  });
  root.className = "loratrainer-panel";
  const status = css(document.createElement("div"), { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
  status.className = "loratrainer-status";
  status.textContent = "not trained yet";
  const canvas = css(document.createElement("canvas"), { width: "100%", height: "120px", flex: "0 0 120px" });
  canvas.className = "loratrainer-chart";
  canvas.dataset.points = "0";
  const estimate = css(document.createElement("div"), { opacity: "0.8" });
  estimate.className = "loratrainer-estimate";
  const samples = css(document.createElement("div"), { display: "flex", gap: "2px", flex: "1 1 auto", minHeight: "0", overflow: "hidden" });
  samples.className = "loratrainer-samples";
  root.append(status, canvas, estimate, samples);
  const widget = node.addDOMWidget("loratrainer_live", "loratrainer_live", root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 220,
  });
  widget.serialize = false; // keep it out of widgets_values: saved workflows stay positional-compatible
  const panel = { root, status, canvas, estimate, samples, widget, shownSample: null };
  node.__loratrainerPanel = panel; // node ids are assigned after nodeCreated when a graph loads
  return panel;
}

function panelFor(node) {
  const panel = node.__loratrainerPanel ?? makePanel(node);
  panels.set(String(node.id), panel);
  return panel;
}

function draw(panel, state) {
  const { canvas } = panel;
  const width = Math.max(120, canvas.clientWidth || 300);
  const height = Math.max(60, canvas.clientHeight || 120);
  const ratio = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, width, height);
  const g = layout(state.losses, { firstStep: state.firstStep, total: state.total, width, height,
    validation: state.validation });
  ctx.strokeStyle = "rgba(255,255,255,0.25)";
  ctx.strokeRect(g.plot.x, g.plot.y, g.plot.w, g.plot.h);
  ctx.fillStyle = "rgba(255,255,255,0.7)";
  ctx.font = "10px sans-serif";
  if (state.losses.length || state.validation.length) {
    for (const t of g.ticks) ctx.fillText(t.label, 2, t.y + 3);
  }
  ctx.fillText(`step ${g.steps}`, g.plot.x + g.plot.w - 48, height - 4);
  const line = (points, colour, widthPx) => {
    if (!points.length) return;
    ctx.strokeStyle = colour;
    ctx.lineWidth = widthPx;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (points.length === 1) ctx.lineTo(points[0][0] + 1, points[0][1]);
    ctx.stroke();
  };
  line(g.raw, "rgba(110,170,255,0.45)", 1);
  line(g.smooth, "rgba(255,170,60,1)", 2);
  line(g.validation, "rgba(90,220,120,1)", 2);
  ctx.fillStyle = "rgba(90,220,120,1)";
  for (const [x, y] of g.validation) ctx.fillRect(x - 2, y - 2, 4, 4); // measurements, not a per-step series
  if (g.validation.length) ctx.fillText("validation", g.plot.x + 4, g.plot.y + 10);
  canvas.dataset.points = String(state.losses.length);
  panel.status.textContent = state.statusLine();
  const e = state.estimate;
  panel.estimate.textContent = e
    ? `estimate: peak ${(e.peak_bytes / 2 ** 30).toFixed(1)} GiB` +
      (e.free_bytes != null ? ` of ${(e.free_bytes / 2 ** 30).toFixed(1)} GiB free` : "") +
      (e.total_seconds != null ? `, ~${formatDuration(e.total_seconds)}` : "")
    : "";
  const sample = state.latestSample();
  if (sample && sample !== panel.shownSample) {
    panel.shownSample = sample;
    panel.samples.replaceChildren(
      ...sample.images.map((image) => {
        const img = css(document.createElement("img"), { maxHeight: "100%", maxWidth: `${100 / sample.images.length}%`, objectFit: "contain" });
        img.className = "loratrainer-sample";
        img.title = `step ${sample.step}` + (sample.prompts?.length ? `: ${sample.prompts.join(" | ")}` : "");
        img.src = api.apiURL(viewPath(image));
        return img;
      }),
    );
  }
}

function nodeFor(id) {
  if (id == null || !app.graph) return null;
  return app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id) ?? null;
}

/** Re-draw node ``nodeId`` of the workflow shown now from its run, if it has one. */
function refresh(nodeId) {
  const state = runFor(nodeId);
  const node = nodeFor(nodeId);
  if (!state || !node || node.comfyClass !== TRAIN_NODE) return;
  draw(panelFor(node), state);
  node.setDirtyCanvas?.(true, false);
}

function onMessage(type) {
  return (event) => {
    const data = event.detail || {};
    if (data.node == null) return;
    const key = keyOfRun(data.prompt_id, data.node);
    let state = runs.get(key);
    if (!state) runs.set(key, (state = new RunState(data.run_id)));
    if (state.apply(type, data)) refresh(String(data.node));
  };
}

let refreshing = null;
let refreshAgain = false;
async function refreshLoraLists() {
  // Several files land close together (state file, then the LoRA ~2 s later): one refresh at a time, and one
  // more after it when a file was written while it ran, so the last file always makes it into the lists.
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    try {
      do {
        refreshAgain = false;
        if (typeof app.refreshComboInNodes === "function") await app.refreshComboInNodes();
      } while (refreshAgain);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/** Re-draw every Train LoRA node from the server's run records (page load, reconnect). */
export async function restoreRuns() {
  let list;
  try {
    const response = await api.fetchApi("/loratrainer/runs", { cache: "no-store" });
    if (!response.ok) return;
    list = (await response.json()).runs || [];
  } catch {
    return;
  }
  const newest = new Map();
  for (const summary of list) {
    if (summary.node == null || !promptWorkflows.has(String(summary.prompt_id))) continue; // not queued here
    const key = keyOfRun(summary.prompt_id, summary.node);
    const prior = newest.get(key);
    if (!prior || prior.started <= summary.started) newest.set(key, summary);
  }
  for (const [key, summary] of newest) {
    const shown = runs.get(key);
    if (shown && shown.runId === summary.run_id && shown.status === summary.status && shown.step === summary.step) continue;
    try {
      const response = await api.fetchApi(`/loratrainer/runs/${summary.run_id}`, { cache: "no-store" });
      if (!response.ok) continue;
      runs.set(key, RunState.fromRecord(await response.json()));
      refresh(String(summary.node));
    } catch {
      /* the next message fills it in */
    }
  }
}

app.registerExtension({
  name: "comfyui-lora-trainer.ui",
  async setup() {
    api.addEventListener(EVENTS.run, onMessage("run"));
    api.addEventListener(EVENTS.progress, onMessage("progress"));
    api.addEventListener(EVENTS.sample, onMessage("sample"));
    api.addEventListener(EVENTS.validation, onMessage("validation"));
    api.addEventListener(EVENTS.saved, () => refreshLoraLists());
    api.addEventListener("reconnected", () => restoreRuns());
    // the saved workflow is restored after setup (frontend 1.27): try now and once the graph is there
    restoreRuns();
    setTimeout(restoreRuns, 1500);
  },
  async nodeCreated(node) {
    if (node.comfyClass === TRAIN_NODE) {
      panelFor(node);
      refresh(node.id);
    }
  },
  async loadedGraphNode(node) {
    if (node.comfyClass === TRAIN_NODE) refresh(node.id);
  },
  async afterConfigureGraph() {
    // another workflow is shown: its Train LoRA nodes show their own runs (or none), never the last graph's
    for (const node of app.graph?._nodes ?? []) {
      if (node.comfyClass === TRAIN_NODE) {
        panelFor(node);
        refresh(node.id);
      }
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== DATASET_NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join?.("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "loratrainer_report");
      if (!widget) {
        const area = css(document.createElement("textarea"), { width: "100%", height: "100%", font: "11px monospace", resize: "none" });
        area.readOnly = true;
        widget = this.addDOMWidget("loratrainer_report", "loratrainer_report", area, { serialize: false, getMinHeight: () => 120 });
        widget.serialize = false;
        widget.area = area;
      }
      widget.area.value = text;
      this.setDirtyCanvas?.(true, false);
    };
  },
});
