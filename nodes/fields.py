"""Node widgets built from TrainConfig's own field descriptions (``setting`` in training/config.py).

A widget named after a configuration key takes its type, default, tooltip and range from the field, so
the Train LoRA and Training Options nodes accept what ``TrainConfig.validate()`` accepts. A node may still
override what is its own (another default, a tooltip about the node, COMBO options from the host).
"""

from __future__ import annotations

import dataclasses

from ..training.config import TrainConfig
from .spec import In

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
KINDS = {"bool": "BOOLEAN", "int": "INT", "float": "FLOAT", "float | None": "FLOAT", "str": "STRING"}
HELP = object()  # tooltip: the field's help text


def config_default(key: str):
    f = FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def widget_range(key: str) -> dict:
    """min/max/step of the key's widget: the accepted range, narrowed where the field's ``widget`` says so
    (inclusive bounds only: an exclusive one such as ``gt=0`` needs a widget minimum of its own)."""
    meta = FIELDS[key].metadata
    bounds = {k: meta[k] for k in ("min", "max") if k in meta}
    bounds.update(meta.get("widget", {}))
    if KINDS.get(FIELDS[key].type) == "FLOAT":
        bounds = {k: float(v) for k, v in bounds.items()}
    return bounds


def config_input(key: str, name: str | None = None, *, kind: str | None = None, default=dataclasses.MISSING,
                 tooltip=HELP, options=None, **widget) -> In:
    """An input for TrainConfig field ``key`` (named ``name``, default the key). Type, default, tooltip,
    range and choices (a COMBO) follow the field unless given."""
    f = FIELDS[key]
    if options is None and kind is None and "choices" in f.metadata:
        options = f.metadata["choices"]
    if options is not None and not callable(options):
        options = list(options)
    kind = kind or ("COMBO" if options is not None else KINDS[f.type])
    if kind in ("INT", "FLOAT"):
        widget = {**widget_range(key), **widget}
    return In(
        name or key, kind,
        default=config_default(key) if default is dataclasses.MISSING else default,
        options=options,
        tooltip=f.metadata["help"] if tooltip is HELP else tooltip,
        **widget,
    )
