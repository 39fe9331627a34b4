"""``python -m comfyui_lora_trainer.bench``: run the benchmarks, print a table, write JSON results."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from .measure import environment

PHOTO_SIZE = 768  # the CPU comparison also runs on the sample images upscaled to this size, as photos are

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _mib(value):
    return f"{value / 2**20:.0f} MiB" if value else "n/a"


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['name']}")
        if "skipped" in r:
            lines.append(f"   skipped: {r['skipped']}")
        elif "ours" in r and "reference" in r:
            o, ref = r["ours"], r["reference"]
            lines.append(f"   {'':12}{'end-to-end':>12}{'s/step':>10}{'peak RSS':>12}")
            for label, row in (("ours", o), ("reference", ref)):
                lines.append(f"   {label:12}{row['seconds']:>11.2f}s{row['seconds_per_step']:>10.4f}{_mib(row['peak_rss_bytes']):>12}")
            lines.append(f"   speed-up: {r['speedup_end_to_end']:.2f}x end to end (goal >= 2), {r['speedup_per_step']:.2f}x per step"
                         + (f", {r['speedup_cpu_seconds']:.2f}x in CPU seconds" if r.get("speedup_cpu_seconds") else "")
                         + (f"; peak RSS ratio {r['peak_rss_ratio']:.2f}" if r.get("peak_rss_ratio") else ""))
        elif "core" in r:
            lines.append(f"   {'':22}{'s/step':>9}{'node s':>9}{'peak RSS':>11}{'growth':>11}")
            for label, key in (("core TrainLoraNode", "core"), ("ours (attention)", "ours"), ("ours (full)", "ours_full")):
                if key in r:
                    row = r[key]
                    lines.append(f"   {label:22}{row['seconds_per_step']:>9.3f}{row['seconds_node']:>9.1f}"
                                 f"{_mib(row['peak_rss_bytes']):>11}{_mib(row.get('peak_rss_growth_bytes')):>11}")
            lines.append(f"   s/step ratio ours/core: {r['step_time_ratio']:.2f} (goal <= 0.5)"
                         + (f"; full targets {r['step_time_ratio_full']:.2f}" if "step_time_ratio_full" in r else ""))
        elif "rows" in r:
            lines.append(f"   {'model':6}{'px':>6}{'bs':>4}{'gc':>4}{'samples/s':>11}{'TFLOP/step':>12}{'MFU':>7}{'VRAM':>11}")
            for row in r["rows"]:
                if "error" in row:
                    lines.append(f"   {row['family']:6}{row['resolution']:>6}{row['batch_size']:>4}   {row['error']}")
                    continue
                mfu = f"{row['mfu'] * 100:.0f}%" if row["mfu"] is not None else "n/a"
                lines.append(f"   {row['family']:6}{row['resolution']:>6}{row['batch_size']:>4}"
                             f"{'on' if row['gradient_checkpointing'] else 'off':>4}{row['samples_per_second']:>11.2f}"
                             f"{row['tflop_per_step']:>12.2f}{mfu:>7}{_mib(row['peak_vram_bytes']):>11}")
    return "\n".join(lines)


def write_results(results: list[dict], directory: str = RESULTS_DIR) -> str:
    os.makedirs(directory, exist_ok=True)
    now = datetime.now(timezone.utc)
    record = {"date": now.isoformat(), "host": socket.gethostname(), "environment": environment(), "results": results}
    path = os.path.join(directory, f"{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    from ..training.formats.safetensors_io import write_atomically

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)

    return write_atomically(path, write, overwrite=True)


def main(args) -> int:
    from .comfy_core import bench_comfy_core
    from .cpu import bench_cpu
    from .gpu import bench_gpu

    selected = set(args.only or ["cpu", "comfy", "gpu"])
    results = []
    if "cpu" in selected:
        for source_size in (None, PHOTO_SIZE):
            results.append(bench_cpu(steps=args.steps, repeats=args.repeats, source_size=source_size))
            print(table(results[-1:]), flush=True)
    if "comfy" in selected:
        comfyui_dir = args.comfyui_dir or os.environ.get("COMFYUI_DIR")
        if comfyui_dir:
            results.append(bench_comfy_core(comfyui_dir))
        else:
            results.append({"name": "comfyui: ours vs core TrainLoraNode", "skipped": "set COMFYUI_DIR or --comfyui-dir"})
        print(table(results[-1:]), flush=True)
    if "gpu" in selected:
        results.append(bench_gpu())
        print(table(results[-1:]), flush=True)
    path = write_results(results, args.results_dir or RESULTS_DIR)
    print(f"wrote {path}")
    return 0
