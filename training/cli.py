"""The command-line host: ``python -m comfyui_lora_trainer <subcommand>``.

It turns events from the backend into log lines and Ctrl-C into the backend's stop request, as the
ComfyUI nodes turn them into a progress bar and Cancel.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

from .lora_cli import add_parsers as add_lora_tool_parsers


def _print_events(log_every: int):
    last = {"t": 0.0}

    def handle(event: dict):
        kind = event.get("type")
        if kind == "log":
            print(event["message"], flush=True)
        elif kind == "start":
            print(
                f"training {event['total']} steps on {event['images']} images "
                f"({event['samples']} samples per epoch with repeats)",
                flush=True,
            )
        elif kind == "step":
            step, total = event["step"], event["total"]
            if step == 1 or step == total or step % log_every == 0:
                rate = step / max(event["elapsed"], 1e-9)
                eta = (total - step) / max(rate, 1e-9)
                print(f"step {step}/{total}  loss {event['loss']:.5f}  {rate:.2f} steps/s  eta {eta:.0f}s", flush=True)
        elif kind == "validation":
            best = f" (best {event['best']:.5f} at step {event['best_step']})" if event.get("best_step") is not None \
                else ""
            print(f"step {event['step']}: validation loss {event['loss']:.5f}{best}", flush=True)
        elif kind == "saved":
            print(f"wrote {event['path']}", flush=True)
        elif kind == "checkpoint":
            print(f"step {event['step']}: saved {event['path']}", flush=True)
        elif kind == "state":
            print(f"step {event['step']}: saved training state {event['path']} (resume_from = this file)", flush=True)
        elif kind == "sample":
            where = f" -> {os.path.dirname(event['paths'][0])}" if event.get("paths") else ""
            print(f"step {event['step']}: {len(event['images'])} sample image(s){where}", flush=True)
        last["t"] = time.time()

    return handle


class _StopOnCtrlC:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: abort at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this step and saving what was learned (Ctrl-C again to abort)", flush=True)

        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc):
        try:
            signal.signal(signal.SIGINT, self.previous)
        except ValueError:
            pass

    def __call__(self) -> bool:
        return self.requested


def run_training(config) -> int:
    from .loop import train

    with _StopOnCtrlC() as stop:
        result = train(config, events=_print_events(config.log_every), should_stop=stop)
    if os.environ.get("RANK", "0") != "0" or not result.losses:  # other processes of accelerate launch
        return 0
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"done: {result.steps_done} steps in {result.seconds:.1f}s; loss {first:.4f} -> {last:.4f} (mean of last 10)"
          + validation_summary(result))
    return 0


def validation_summary(result) -> str:
    """'; validation 0.41 (best 0.39 at step 300)' for the done lines; "" without validation."""
    if not result.validation:
        return ""
    text = f"; validation {result.validation[-1][1]:.4f}"
    if result.best_validation_step is not None:
        text += f" (best {result.best_validation_loss:.4f} at step {result.best_validation_step})"
    if result.best_path:
        text += f", best LoRA {result.best_path}"
    return text


def free_name(directory: str, stem: str, ext: str) -> str:
    candidate, n = stem, 1
    while os.path.exists(os.path.join(directory, candidate + ext)):
        candidate, n = f"{stem}_{n}", n + 1
    return candidate


def cmd_demo(args) -> int:
    from .bnb_gate import bitsandbytes_hidden_unless
    from .config import TrainConfig
    from .loop import train
    from .models import tiny_tokenizer_dir, write_tiny_checkpoint
    from .plot import loss_chart

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    dataset = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_dataset")
    name = free_name(out, "demo_lora", ".safetensors")
    # the tiny model is built before train() (which gates bitsandbytes itself): gate it here too
    with tempfile.TemporaryDirectory() as scratch, bitsandbytes_hidden_unless(False):
        checkpoint = write_tiny_checkpoint(os.path.join(scratch, "tiny_sd1.safetensors"), family="sd1", seed=0)
        config = TrainConfig(
            checkpoint=checkpoint,
            tokenizer=tiny_tokenizer_dir(),
            dataset=dataset,
            output_dir=out,
            output_name=name,
            steps=args.steps,
            rank=8,
            alpha=8.0,
            learning_rate=1e-3,
            resolution=64,
            batch_size=2,
            seed=args.seed,
            device="cpu",
            trigger_word="shapetoy",
            log_every=25,
            validation_split=2,  # two of the eight shapes are held out: the chart's second series
            validate_every_n_steps=max(1, args.steps // 10),
        )
        print(f"demo: tiny SD1.x-shaped model, {dataset}, {config.steps} steps on the CPU")
        with _StopOnCtrlC() as stop:
            result = train(config, events=_print_events(config.log_every), should_stop=stop)
    plot_path = os.path.join(out, name + "_loss.png")
    loss_chart(result.losses, title=f"{name} loss", validation=result.validation).save(plot_path)
    first = sum(result.losses[:10]) / len(result.losses[:10])
    last = sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"wrote {plot_path}")
    print(f"loss {first:.4f} -> {last:.4f} (mean of first/last 10 steps){validation_summary(result)}, "
          f"{result.seconds:.1f}s")
    return 0


def cmd_train(args) -> int:
    from .config import TrainConfig

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    config = TrainConfig.from_toml(args.config)
    values = config.to_dict()
    for override in args.set or []:
        key, _, value = override.partition("=")
        try:
            values[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = value  # a bare string
    return run_training(TrainConfig.from_dict(values, source=args.config).validate())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_lora_trainer",
        description="Train, merge and inspect Stable Diffusion LoRAs (the backend of the ComfyUI nodes).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a LoRA on the bundled sample dataset with a tiny model on the CPU")
    demo.add_argument("--out", default="demo_out", help="folder for the LoRA and the loss plot (default: demo_out)")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a LoRA from a TOML config (keys in docs/configuration.md)")
    train.add_argument("config", help="path to CONFIG.toml")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (TOML value)")
    train.set_defaults(func=cmd_train)

    add_lora_tool_parsers(sub)  # merge, resize, merge-into, inspect
    return parser


def main(argv=None) -> int:
    import logging

    from .loop import TrainingError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by accident
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
