"""Subcommands for the LoRA tools: merge, resize, merge-into, inspect (registered by training/cli.py)."""

from __future__ import annotations

import json


def parse_weighted(spec: str) -> tuple[str, float]:
    """``file.safetensors[:weight]``; a Windows drive letter is not a weight."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def _weighted(specs):
    from .formats import load_lora_file

    return [(load_lora_file(path), weight) for path, weight in map(parse_weighted, specs)]


def _print_report(report, per_module: bool) -> None:
    print(report.summary())
    if per_module and report.rel_errors:
        for name, err in sorted(report.rel_errors.items(), key=lambda kv: -kv[1]):
            print(f"  {err:.3e}  r={report.ranks.get(name, '-')}  {name}")


def cmd_merge(args) -> int:
    from .formats import save_lora_file
    from .merge import merge_loras

    items = _weighted(args.inputs)
    if len(items) < 1:
        raise ValueError("give at least one LoRA")
    merged, report = merge_loras(items, args.mode, rank=args.rank, energy=args.energy)
    written = save_lora_file(args.out, merged, overwrite=args.overwrite, dtype=args.dtype)
    _print_report(report, args.verbose)
    print(f"wrote {written} ({len(report.ranks)} modules)")
    return 0


def cmd_resize(args) -> int:
    from .formats import load_lora_file, save_lora_file
    from .lora_tools import resize_lora

    if args.rank is None and args.energy is None:
        raise ValueError("resize: give --rank R and/or --energy F (e.g. --energy 0.99)")
    resized, report = resize_lora(load_lora_file(args.lora), rank=args.rank, energy=args.energy,
                                  checkpoint=args.checkpoint)
    written = save_lora_file(args.out, resized, overwrite=args.overwrite, dtype=args.dtype)
    _print_report(report, args.verbose)
    print(f"wrote {written}")
    return 0


def cmd_merge_into(args) -> int:
    from .lora_tools import merge_into_checkpoint

    report = merge_into_checkpoint(args.checkpoint, _weighted(args.loras), args.out, overwrite=args.overwrite,
                                   allow_unused=args.allow_unused)
    for item in report.per_lora:
        extra = f", {len(item['unused'])} module(s) unused" if item["unused"] else ""
        print(f"  {item['name']} at {item['strength']:g}{extra}")
    print(f"wrote {report.path} ({report.family}, {report.patched} weights changed)")
    return 0


def cmd_inspect(args) -> int:
    from .lora_tools import format_inspect, inspect_lora

    info = inspect_lora(args.lora, base=args.base)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
    return 0


def add_parsers(sub) -> None:
    merge = sub.add_parser("merge", help="merge LoRAs with weights into one (exact: ranks concatenated; svd: re-ranked)")
    merge.add_argument("inputs", nargs="+", metavar="LORA[:WEIGHT]")
    merge.add_argument("--out", required=True)
    merge.add_argument("--mode", choices=["exact", "svd"], default="exact")
    merge.add_argument("--rank", type=int, help="svd: target rank")
    merge.add_argument("--energy", type=float, help="svd: keep this fraction of each module's squared singular values")
    merge.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="save precision (default: the inputs')")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("-v", "--verbose", action="store_true", help="print the error of every module")
    merge.set_defaults(func=cmd_merge)

    resize = sub.add_parser("resize", help="SVD a LoRA (any type) to a lower rank or an energy fraction")
    resize.add_argument("lora")
    resize.add_argument("--out", required=True)
    resize.add_argument("--rank", type=int)
    resize.add_argument("--energy", type=float)
    resize.add_argument("--checkpoint", help="base checkpoint (needed to bake DoRA modules)")
    resize.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    resize.add_argument("--overwrite", action="store_true")
    resize.add_argument("-v", "--verbose", action="store_true")
    resize.set_defaults(func=cmd_resize)

    into = sub.add_parser("merge-into", help="write a new checkpoint with LoRAs baked in at given strengths")
    into.add_argument("checkpoint")
    into.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]")
    into.add_argument("--out", required=True)
    into.add_argument("--overwrite", action="store_true")
    into.add_argument("--allow-unused", action="store_true", help="skip LoRA modules the checkpoint has no weight for")
    into.set_defaults(func=cmd_merge_into)

    inspect = sub.add_parser("inspect", help="format, base model, per-block rank/alpha and metadata of a LoRA")
    inspect.add_argument("lora")
    inspect.add_argument("--base", help="a checkpoint: list the LoRA modules it would not use")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
