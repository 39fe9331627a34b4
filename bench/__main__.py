"""``python -m comfyui_lora_trainer.bench``: the benchmarks' own entry (the shipped CLI does not import them)."""

from __future__ import annotations

import argparse

from .run import main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_lora_trainer.bench",
                                     description="speed and memory benchmarks against reference runs (bench/README.md)")
    parser.add_argument("--only", action="append", choices=["cpu", "comfy", "gpu"], help="run only these (repeatable)")
    parser.add_argument("--steps", type=int, default=100, help="steps of the CPU comparison")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side of the CPU comparison (best kept)")
    parser.add_argument("--comfyui-dir", help="ComfyUI checkout for the core-node comparison (default: $COMFYUI_DIR)")
    parser.add_argument("--results-dir", help="where the JSON goes (default: bench/results)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
