"""Keep bitsandbytes out of runs that use neither QLoRA nor 8-bit AdamW.

peft (``peft/helpers.py``) and diffusers (``diffusers/quantizers/bitsandbytes``) import bitsandbytes eagerly
when it is installed, and bitsandbytes >= 0.49 then looks up hub kernels and, offline, prints four warnings on
every run. Our own code imports it only where it is used (``adapters.py``, ``optim.py``); this gate makes the
libraries' eager imports see it as absent for the length of a run that does not need it.

The gate only hides what nobody has imported yet: when bitsandbytes is already imported it does nothing. Where
diffusers has already recorded it as available (diffusers was imported before the run), that record reads
"absent" for the length of the block too, so diffusers does not try the import. Afterwards bitsandbytes imports
again as usual, diffusers' record is restored and peft's cached "is bitsandbytes available" answers are cleared,
so a later QLoRA run in the same process (ComfyUI) finds it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

MODULE = "bitsandbytes"


def needs_bitsandbytes(config) -> bool:
    """QLoRA (``quantize_base`` other than none) or ``optimizer = 'adamw8bit'``."""
    return getattr(config, "quantize_base", "none") != "none" or getattr(config, "optimizer", "") == "adamw8bit"




def _forget_peft_answers() -> None:
    import_utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        cache_clear = getattr(getattr(import_utils, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


@contextmanager
def bitsandbytes_hidden_unless(needed: bool):
    """Within the block, ``import bitsandbytes`` raises ImportError unless ``needed`` (see the module doc)."""
    if needed or MODULE in sys.modules:
        yield
        return
    sys.modules[MODULE] = None  # the import system's "not importable" marker
    diffusers_utils = sys.modules.get("diffusers.utils.import_utils")
    recorded = getattr(diffusers_utils, "_bitsandbytes_available", None)
    if recorded:
        diffusers_utils._bitsandbytes_available = False
    try:
        yield
    finally:
        if MODULE in sys.modules and sys.modules[MODULE] is None:
            del sys.modules[MODULE]
        if recorded:
            diffusers_utils._bitsandbytes_available = recorded
        _forget_peft_answers()
