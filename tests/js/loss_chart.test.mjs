// Unit tests for web/loss_chart.js (the Train LoRA node's chart logic). Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  smooth, formatDuration, formatRate, rateAndEta, yRange, downsample, layout, RunState, viewPath, formatLoss,
  addValidationPoint,
} from "../../web/loss_chart.js";

test("smooth is a debiased EMA: constant in, constant out; first value kept", () => {
  assert.deepEqual(smooth([2, 2, 2]).map((v) => +v.toFixed(12)), [2, 2, 2]);
  const s = smooth([1, 0], 0.5);
  assert.equal(s[0], 1);
  assert.ok(s[1] > 0 && s[1] < 1);
  assert.deepEqual(smooth([]), []);
  // the same numbers as nodes/runs.py smoothed([1, 0, 0.5], 0.9)
  const py = [1.0, 0.4736842105263158, 0.4833948339483395];
  smooth([1, 0, 0.5]).forEach((v, i) => assert.ok(Math.abs(v - py[i]) < 1e-12));
});

test("durations, rates and losses format for people", () => {
  assert.equal(formatDuration(65), "1:05");
  assert.equal(formatDuration(3725), "1:02:05");
  assert.equal(formatDuration(null), "--:--");
  assert.equal(formatDuration(Infinity), "--:--");
  assert.equal(formatRate(2.5), "2.50 it/s");
  assert.equal(formatRate(0.25), "4.0 s/it");
  assert.equal(formatRate(0), "-- it/s");
  assert.equal(formatLoss(0.12345), "0.123");
  assert.equal(formatLoss(0.012345), "0.0123");
  assert.equal(formatLoss(1e-5), "1.00e-5");
});

test("rate and ETA come from the recent steps", () => {
  const times = [1, 2, 3, 4, 5].map((s) => [s, s * 0.5]);
  const { rate, eta } = rateAndEta(times, 5, 25);
  assert.equal(rate, 2);
  assert.equal(eta, 10);
  assert.deepEqual(rateAndEta([[1, 0]], 1, 10), { rate: null, eta: null });
});

test("yRange pads, and a flat series still gets a band", () => {
  const [lo, hi] = yRange([1, 2]);
  assert.ok(lo < 1 && hi > 2);
  const [flo, fhi] = yRange([0.5, 0.5]);
  assert.ok(flo < 0.5 && fhi > 0.5);
  assert.deepEqual(yRange([]), [0, 1]);
});

test("downsample keeps first, last and spikes", () => {
  const points = Array.from({ length: 5000 }, (_, i) => [i, i === 2500 ? 100 : 1]);
  const out = downsample(points, 200);
  assert.ok(out.length <= 204);
  assert.deepEqual(out[0], [0, 1]);
  assert.deepEqual(out[out.length - 1], [4999, 1]);
  assert.ok(out.some((p) => p[1] === 100));
  assert.equal(downsample(points.slice(0, 10), 200).length, 10);
});

test("layout maps steps to x and loss to y inside the plot box", () => {
  const g = layout([1, 0.5, 0.25, 0.5], { total: 8, width: 244, height: 126 });
  // plot box: x 44..236 (w 192), y 8..108 (h 100)
  assert.equal(g.plot.w, 192);
  assert.equal(g.raw.length, 4);
  assert.equal(g.raw[0][0], 44 + 192 / 8);
  assert.equal(g.raw[3][0], 44 + 192 / 2);
  const ys = g.raw.map((p) => p[1]);
  assert.ok(ys[0] < ys[1] && ys[1] < ys[2], "higher loss is drawn higher (smaller y)");
  assert.ok(Math.min(...ys) >= 8 && Math.max(...ys) <= 108);
  assert.equal(g.smooth.length, 4);
  assert.equal(g.ticks.length, 3);
  assert.equal(g.last, 0.5);
  // a resumed run starts at its step
  const r = layout([0.3], { firstStep: 4, total: 8, width: 244, height: 126 });
  assert.equal(r.raw[0][0], 44 + (192 * 5) / 8);
});

test("RunState follows the server's messages", () => {
  const s = new RunState();
  s.apply("run", { run_id: "a", status: "starting", total: 4, estimate: { peak_bytes: 2 ** 30, fits: true } });
  s.apply("progress", { run_id: "a", step: 1, total: 4, loss: 0.5 }, 10);
  s.apply("progress", { run_id: "a", step: 2, total: 4, loss: 0.4 }, 11);
  assert.deepEqual(s.losses, [0.5, 0.4]);
  assert.equal(s.step, 2);
  assert.equal(s.rate, 1);
  assert.equal(s.eta, 2);
  assert.match(s.statusLine(), /step 2\/4 · loss 0\.400 \(avg .*\) · 1\.00 it\/s · ETA 0:02/);
  s.apply("sample", { run_id: "a", step: 2, images: [{ filename: "x.png", subfolder: "loratrainer", type: "temp" }] });
  assert.equal(s.latestSample().images[0].filename, "x.png");
  s.apply("run", { run_id: "a", status: "done", file: "my.safetensors" });
  assert.match(s.statusLine(), /done/);
  // a new run on the same node starts a fresh chart
  s.apply("progress", { run_id: "b", step: 1, total: 2, loss: 0.9 });
  assert.deepEqual(s.losses, [0.9]);
  assert.equal(s.runId, "b");
  // a message of another run that is not a start/progress is ignored
  assert.equal(s.apply("sample", { run_id: "a", step: 3, images: [] }), false);
});

test("a record from GET /loratrainer/runs/{id} restores the chart", () => {
  const record = {
    run_id: "c", status: "running", step: 7, total: 10, first_step: 4, losses: [0.3, 0.2, 0.1],
    elapsed: 6, samples: [{ step: 6, images: [{ filename: "s.png", subfolder: "", type: "temp" }] }], estimate: null,
  };
  const s = RunState.fromRecord(record);
  assert.equal(s.firstStep, 4);
  assert.deepEqual(s.losses, [0.3, 0.2, 0.1]);
  assert.equal(s.rate, 0.5);
  assert.equal(s.eta, 6);
  assert.equal(s.latestSample().step, 6);
  // the next live step continues the same series
  s.apply("progress", { run_id: "c", step: 8, total: 10, loss: 0.05 });
  assert.deepEqual(s.losses, [0.3, 0.2, 0.1, 0.05]);
});

test("a resumed run's first message carries the earlier losses: the chart starts at step 1", () => {
  const s = new RunState();
  s.apply("run", { run_id: "d", status: "starting", total: 6 });
  s.apply("run", { run_id: "d", status: "running", total: 6, step: 3, first_step: 0, resumed_at: 3,
    losses: [0.9, 0.8, 0.7] });
  assert.deepEqual(s.losses, [0.9, 0.8, 0.7]);
  assert.equal(s.firstStep, 0);
  assert.equal(s.step, 3);
  s.apply("progress", { run_id: "d", step: 4, total: 6, loss: 0.6 });
  assert.deepEqual(s.losses, [0.9, 0.8, 0.7, 0.6]);
  assert.equal(layout(s.losses, { firstStep: s.firstStep, total: 6, width: 244 }).raw[0][0], 44 + 192 / 6);
  // a reloaded page: speed counts the steps since the resume, not from step 0
  const r = RunState.fromRecord({ run_id: "d", status: "running", step: 5, total: 6, first_step: 0, resumed_at: 3,
    losses: [0.9, 0.8, 0.7, 0.6, 0.5], elapsed: 4 });
  assert.equal(r.losses.length, 5);
  assert.equal(r.rate, 0.5);
  assert.equal(r.eta, 2);
});

test("viewPath builds a /view query", () => {
  assert.equal(viewPath({ filename: "a b.png", subfolder: "loratrainer", type: "temp" }),
    "/view?filename=a+b.png&subfolder=loratrainer&type=temp");
});

test("validation is a second series on the same axes, kept by step (issue 15)", () => {
  const losses = [1, 0.8, 0.6, 0.5];
  const g = layout(losses, { total: 4, width: 144, height: 126, validation: [[0, 2], [2, 0.7], [4, 0.65]] });
  assert.equal(g.validation.length, 3);
  assert.equal(g.hi > 2 && g.lo < 0.5, true); // the y range covers both series
  assert.equal(g.validation[0][0], g.plot.x); // step 0 at the left edge
  assert.equal(g.validation[2][0], g.raw[g.raw.length - 1][0]); // step 4 where the training loss of step 4 is
  assert.equal(g.lastValidation, 0.65);
  assert.deepEqual(layout(losses, { total: 4 }).validation, []);
  assert.deepEqual(addValidationPoint([[0, 1], [4, 0.5]], 2, 0.7), [[0, 1], [2, 0.7], [4, 0.5]]);
  assert.deepEqual(addValidationPoint([[0, 1], [4, 0.5]], 4, 0.4), [[0, 1], [4, 0.4]]);

  const state = new RunState("r1");
  state.apply("progress", { run_id: "r1", step: 1, total: 4, loss: 1 });
  state.apply("validation", { run_id: "r1", step: 0, loss: 2 });
  state.apply("validation", { run_id: "r1", step: 2, loss: 0.7 });
  assert.deepEqual(state.validation, [[0, 2], [2, 0.7]]);
  assert.match(state.statusLine(), /val 0\.700 \(best 0\.700 @ 2\)/);
  const reloaded = RunState.fromRecord({ run_id: "r1", status: "running", step: 2, total: 4, losses: [1, 0.9],
    validation: [{ step: 0, loss: 2 }, { step: 2, loss: 0.7 }] });
  assert.deepEqual(reloaded.validation, state.validation);
  assert.deepEqual(RunState.fromRecord({ run_id: "r2", status: "done", step: 1, total: 1, losses: [1] }).validation, []);
});
