// Pure chart logic for the Train LoRA node: no DOM, no ComfyUI imports, so `node --test` can test it
// (tests/js/). ComfyUI imports every .js file under web/ as an extension; this one only exports.

/** Debiased exponential moving average (TensorBoard's smoothing); nodes/runs.py `smoothed` is the same. */
export function smooth(values, weight = 0.9) {
  const out = [];
  let last = 0;
  let norm = 0;
  for (const value of values) {
    last = weight * last + (1 - weight) * value;
    norm = weight * norm + (1 - weight);
    out.push(norm ? last / norm : value);
  }
  return out;
}

/** "m:ss" or "h:mm:ss"; "--:--" when unknown. */
export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "--:--";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
}

/** Speed as the UI shows it: "2.31 it/s" at or above one step a second, else "4.2 s/it". */
export function formatRate(rate) {
  if (!rate || !Number.isFinite(rate) || rate <= 0) return "-- it/s";
  return rate >= 1 ? `${rate.toFixed(2)} it/s` : `${(1 / rate).toFixed(1)} s/it`;
}

/** Steps per second over the last `window` (step, time) pairs, and the seconds left at that speed. */
export function rateAndEta(times, step, total, window = 20) {
  const recent = times.slice(-window - 1);
  if (recent.length < 2) return { rate: null, eta: null };
  const [s0, t0] = recent[0];
  const [s1, t1] = recent[recent.length - 1];
  if (t1 <= t0 || s1 <= s0) return { rate: null, eta: null };
  const rate = (s1 - s0) / (t1 - t0);
  return { rate, eta: (total - step) / rate };
}

/** A y range with a little padding; a flat series gets a visible band. */
export function yRange(values) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return [0, 1];
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) * 0.1 || 0.5;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

/** Keep at most `max` points, always the first and the last (min/max per bucket keeps spikes visible). */
export function downsample(points, max = 600) {
  if (points.length <= max) return points;
  const buckets = Math.floor(max / 2);
  const size = points.length / buckets;
  const out = [points[0]];
  for (let b = 0; b < buckets; b++) {
    const slice = points.slice(Math.floor(b * size), Math.floor((b + 1) * size));
    if (!slice.length) continue;
    let lo = slice[0];
    let hi = slice[0];
    for (const p of slice) {
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
    }
    out.push(...(lo[0] <= hi[0] ? [lo, hi] : [hi, lo]));
  }
  out.push(points[points.length - 1]);
  return out.filter((p, i) => i === 0 || p !== out[i - 1]);
}

/**
 * Pixel coordinates for the chart: raw and smoothed polylines inside a box with margins.
 * losses[i] belongs to step firstStep + i + 1; the x axis spans steps 0..total.
 * validation: [[step, loss], ...] (the validation loss, measured every N steps and at step 0), drawn as
 * its own polyline on the same axes; the y range covers both series.
 */
export function layout(losses, { firstStep = 0, total = 0, width = 300, height = 150, weight = 0.9,
  margin = { left: 44, right: 8, top: 8, bottom: 18 }, maxPoints = 600, validation = [] } = {}) {
  const lastValidationStep = validation.length ? validation[validation.length - 1][0] : 0;
  const steps = Math.max(total, firstStep + losses.length, lastValidationStep, 1);
  const plotW = Math.max(1, width - margin.left - margin.right);
  const plotH = Math.max(1, height - margin.top - margin.bottom);
  const smoothed = smooth(losses, weight);
  const [lo, hi] = yRange([...losses, ...validation.map(([, v]) => v)]);
  const x = (step) => margin.left + (step / steps) * plotW;
  const y = (v) => margin.top + (1 - (v - lo) / (hi - lo)) * plotH;
  const raw = downsample(losses.map((v, i) => [x(firstStep + i + 1), y(v)]), maxPoints);
  const smoothPts = downsample(smoothed.map((v, i) => [x(firstStep + i + 1), y(v)]), maxPoints);
  const validationPts = validation.filter(([, v]) => Number.isFinite(v)).map(([step, v]) => [x(step), y(v)]);
  const ticks = [hi, (hi + lo) / 2, lo].map((v) => ({ value: v, y: y(v), label: formatLoss(v) }));
  return { raw, smooth: smoothPts, validation: validationPts, ticks, lo, hi, steps,
    plot: { x: margin.left, y: margin.top, w: plotW, h: plotH },
    last: losses.length ? losses[losses.length - 1] : null,
    lastSmooth: smoothed.length ? smoothed[smoothed.length - 1] : null,
    lastValidation: validation.length ? validation[validation.length - 1][1] : null };
}

/** Insert or replace (same step) one validation point, keeping the list sorted by step. */
export function addValidationPoint(points, step, loss) {
  const out = points.filter(([s]) => s !== step);
  out.push([step, loss]);
  return out.sort((a, b) => a[0] - b[0]);
}

export function formatLoss(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(a < 0.1 ? 4 : 3);
}

/**
 * One run as the node shows it, fed by server messages or by a run record from
 * GET /loratrainer/runs/{id}. Field names follow nodes/runs.py and nodes/train.py.
 */
export class RunState {
  constructor(runId = null) {
    this.runId = runId;
    this.status = "idle";
    this.step = 0;
    this.total = 0;
    this.firstStep = 0;
    this.resumedAt = 0; // a resumed run: the step it continued from (speed counts from there)
    this.losses = [];
    this.validation = []; // [[step, loss], ...]: the validation loss (issue 15), sorted by step
    this.times = []; // [step, seconds] for speed
    this.samples = []; // [{step, images: [{filename, subfolder, type}], prompts}]
    this.estimate = null;
    this.message = "";
    this.rate = null;
    this.eta = null;
  }

  /** Replace everything with a server record (page reloaded mid-run). */
  static fromRecord(record) {
    const state = new RunState(record.run_id);
    state.status = record.status;
    state.step = record.step;
    state.total = record.total;
    state.firstStep = record.first_step || 0;
    state.resumedAt = record.resumed_at || state.firstStep;
    state.losses = [...(record.losses || [])];
    state.validation = (record.validation || []).map((p) => [p.step, p.loss]);
    state.samples = [...(record.samples || [])];
    state.estimate = record.estimate || null;
    state.message = record.message || "";
    if (record.elapsed && record.step > state.resumedAt) {
      state.rate = (record.step - state.resumedAt) / record.elapsed;
      state.eta = (record.total - record.step) / state.rate;
    }
    return state;
  }

  /** Apply one message; returns true when the run shown changed. `type` without the prefix. */
  apply(type, data, now = Date.now() / 1000) {
    if (data.run_id && this.runId && data.run_id !== this.runId) {
      if (type !== "run" && type !== "progress") return false;
      Object.assign(this, new RunState(data.run_id)); // a new run on this node starts a new chart
    }
    if (!this.runId) this.runId = data.run_id || null;
    if (type === "run") {
      this.status = data.status;
      if (data.total) this.total = data.total;
      if (Array.isArray(data.losses)) {
        // a resumed run: the losses before the resumed step, so the chart shows the whole curve
        this.losses = [...data.losses];
        this.firstStep = data.first_step || 0;
        this.resumedAt = data.resumed_at || 0;
        this.step = data.step ?? this.firstStep + this.losses.length;
      }
      if (Array.isArray(data.validation)) this.validation = data.validation.map((p) => [p.step, p.loss]);
      if (data.estimate) this.estimate = data.estimate;
      if (data.message || data.file) this.message = data.message || data.file;
      return true;
    }
    if (type === "progress") {
      if (!this.losses.length && data.step > 1) this.firstStep = data.step - 1;
      const index = data.step - this.firstStep - 1;
      if (index < this.losses.length) this.losses.length = Math.max(0, index); // a repeated step replaces
      this.losses.push(data.loss);
      this.step = data.step;
      this.total = data.total;
      this.status = "running";
      this.times.push([data.step, now]);
      if (this.times.length > 64) this.times.splice(0, this.times.length - 64);
      if (data.rate != null) {
        this.rate = data.rate;
        this.eta = data.eta;
      } else {
        ({ rate: this.rate, eta: this.eta } = rateAndEta(this.times, data.step, data.total));
      }
      return true;
    }
    if (type === "validation") {
      this.validation = addValidationPoint(this.validation, data.step, data.loss);
      return true;
    }
    if (type === "sample") {
      this.samples.push({ step: data.step, images: data.images || [], prompts: data.prompts || [] });
      if (this.samples.length > 64) this.samples.splice(0, this.samples.length - 64);
      return true;
    }
    return false;
  }

  latestSample() {
    return this.samples.length ? this.samples[this.samples.length - 1] : null;
  }

  statusLine() {
    const parts = [`step ${this.step}/${this.total || "?"}`];
    if (this.losses.length) {
      const s = smooth(this.losses.slice(-200));
      parts.push(`loss ${formatLoss(this.losses[this.losses.length - 1])} (avg ${formatLoss(s[s.length - 1])})`);
    }
    if (this.validation.length) {
      const best = this.validation.reduce((a, b) => (b[1] < a[1] ? b : a));
      parts.push(`val ${formatLoss(this.validation[this.validation.length - 1][1])} (best ${formatLoss(best[1])} @ ${best[0]})`);
    }
    if (this.status === "running") parts.push(formatRate(this.rate), `ETA ${formatDuration(this.eta)}`);
    else if (this.status && this.status !== "idle") parts.push(this.status);
    return parts.join(" · ");
  }
}

/** URL path (without the API base) of an image entry {filename, subfolder, type} for GET /view. */
export function viewPath(image) {
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder || "", type: image.type || "temp" });
  return `/view?${q.toString()}`;
}
