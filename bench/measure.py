"""Wall time and peak resident memory of a block of work, in this process."""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: steadier than wall time on a busy machine
    peak_rss_bytes: int | None = None
    rss_before_bytes: int | None = None


@contextmanager
def measured():
    """``with measured() as m: ...`` -> m.seconds, m.peak_rss_bytes (None where not measurable)."""
    gc.collect()
    m = Measurement()
    can_reset = reset_peak_rss()
    m.rss_before_bytes = _read_status("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - start
        m.cpu_seconds = time.process_time() - cpu_start
        m.peak_rss_bytes = _read_status("VmHWM") if can_reset else None


def environment() -> dict:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional in the report
            info[name] = None
    return info
