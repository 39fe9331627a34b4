"""The device matrix on the CPU: CUDA, ROCm (CUDA with torch.version.hip), XPU, MPS and the CPU through
training/devices.py, with fake devices and faked backend calls. Only the CPU runs for real here; a CUDA-only
call left on a path every device takes (torch.cuda.* for an MPS or XPU device) fails these tests."""

from __future__ import annotations

import os
import shutil
import sys
import types

import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.training import devices
from comfyui_lora_trainer.training.devices import CudaOps, DeviceError, DeviceOps, MemoryInfo, MpsOps, \
    PrecisionError, XpuOps
from comfyui_lora_trainer.training.formats.metadata import PRECISION_NOTE_KEY
from tiny_runs import run as tiny_run

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")
GiB = 1024**3


class FakeOps(DeviceOps):
    """A device of any type, with the answers a test gives it; it records the calls it receives."""

    def __init__(self, kind, available=True, bf16=True, fp16=True, memory=None, pin=False, fused=False,
                 label=None):
        self.type, self.label = kind, label or kind.upper()
        self.available, self.bf16, self.fp16 = available, bf16, fp16
        self.memory_info = memory or MemoryInfo(8 * GiB, 16 * GiB)
        self.pin, self.fused = pin, fused
        self.calls: list[str] = []

    def is_available(self):
        return self.available

    def bf16_supported(self, device):
        return self.bf16

    def fp16_supported(self, device):
        return self.fp16

    def generator(self, device, seed):
        self.calls.append("generator")
        return torch.Generator().manual_seed(seed)

    def empty_cache(self):
        self.calls.append("empty_cache")

    def synchronize(self, device):
        self.calls.append("synchronize")

    def memory(self, device):
        self.calls.append("memory")
        return self.memory_info

    def pin_memory(self):
        return self.pin

    def fused_adamw(self):
        return self.fused


@pytest.fixture()
def cuda_raises(monkeypatch):
    """Every torch.cuda call a device-specific path could make raises, except the availability checks
    that are safe on any machine: code for a non-CUDA device that reaches torch.cuda fails the test."""
    # seeding (torch.manual_seed seeds CUDA lazily) and availability checks are safe on any machine
    safe = {"is_available", "device_count", "is_initialized", "_is_compiled", "_lazy_init", "manual_seed_all"}

    def boom(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.cuda.{name} called on a non-CUDA path")
        return call

    for name in ("mem_get_info", "empty_cache", "synchronize", "get_device_name", "is_bf16_supported",
                 "memory_reserved", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                 "current_device", "set_device", "get_device_properties",
                 "memory_stats"):
        assert name not in safe and hasattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, boom(name))


def matrix(cuda=False, xpu=False, mps=False, **kw):
    return devices.override(cuda=FakeOps("cuda", cuda, **kw), xpu=FakeOps("xpu", xpu, **kw),
                            mps=FakeOps("mps", mps, **kw))


# -- which device --------------------------------------------------------------------------------------
@pytest.mark.parametrize("available, expected", [
    ({"cuda", "xpu", "mps"}, "cuda"),
    ({"xpu", "mps"}, "xpu"),
    ({"mps"}, "mps"),
    (set(), "cpu"),
    ({"cuda", "mps"}, "cuda"),
])
def test_auto_picks_cuda_then_xpu_then_mps_then_cpu(available, expected):
    with matrix(cuda="cuda" in available, xpu="xpu" in available, mps="mps" in available):
        assert devices.resolve_device("auto") == torch.device(expected)


def test_named_devices_resolve_or_say_what_to_set():
    with matrix(xpu=True):
        assert devices.resolve_device("xpu:0") == torch.device("xpu", 0)
        assert devices.resolve_device("cpu") == torch.device("cpu")
        with pytest.raises(DeviceError, match=r"device = 'cuda:1'.*CUDA or ROCm.*'auto' or 'cpu'"):
            devices.resolve_device("cuda:1")
        with pytest.raises(DeviceError, match=r"device = 'mps'.*no MPS device"):
            devices.resolve_device("mps")
    with pytest.raises(DeviceError, match=r"device = 'tpu'.*cuda:N / xpu:N"):
        devices.resolve_device("tpu")


def test_config_accepts_every_device_comfyui_hands_the_node():
    from comfyui_lora_trainer.training.config import ConfigError, is_device_name

    for name in ("auto", "cpu", "cuda", "cuda:1", "xpu", "xpu:0", "mps"):
        assert is_device_name(name), name
    for name in ("cuda:", "mps:0", "gpu", "cpu:0", "xpu:a"):
        assert not is_device_name(name), name
    from tiny_runs import cfg

    cfg(device="xpu:0").validate()
    with pytest.raises(ConfigError, match="device"):
        cfg(device="gpu").validate()


def test_rocm_is_cuda_to_torch_and_reported_as_rocm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    ops = devices.for_device("cuda:0")
    assert isinstance(ops, CudaOps) and devices.autocast_device_type("cuda:0") == "cuda"
    assert devices.backend("cuda:0") == "ROCm"
    assert devices.describe(torch.device("cuda:0")) == "cuda:0 (AMD Instinct MI300X, ROCm)"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert devices.backend("cuda") == "CUDA"


# -- which precision -----------------------------------------------------------------------------------
def test_fp16_on_the_cpu_falls_back_to_fp32_and_says_so():
    used, note = devices.resolve_precision("fp16", torch.device("cpu"))
    assert used == "fp32"
    assert "precision = 'fp16'" in note and "fp32 instead" in note and "CPU" in note
    assert devices.resolve_precision("bf16", "cpu") == ("bf16", "")  # CPU autocast runs bf16
    assert devices.resolve_precision("fp32", "cpu") == ("fp32", "")
    assert devices.accelerator_kwargs("cpu", used) == {"mixed_precision": "no", "cpu": True}


@pytest.mark.parametrize("kind, bf16, fp16, asked, used, says", [
    ("cuda", True, True, "bf16", "bf16", ""),
    ("cuda", False, True, "bf16", "fp16", "fp16 with loss scaling instead"),  # pre-Ampere NVIDIA, older AMD
    ("cuda", False, True, "fp16", "fp16", ""),
    ("xpu", True, True, "bf16", "bf16", ""),
    ("xpu", False, False, "fp16", "fp32", "fp32 instead"),
    ("mps", False, True, "bf16", "fp16", "fp16 with loss scaling instead"),
    ("mps", False, False, "bf16", "fp32", "fp32 instead"),
    ("mps", True, True, "fp32", "fp32", ""),
])
def test_precision_matrix(kind, bf16, fp16, asked, used, says):
    with devices.override(**{kind: FakeOps(kind, bf16=bf16, fp16=fp16)}):
        got, note = devices.resolve_precision(asked, torch.device(kind))
    assert got == used
    if says:
        assert says in note and f"precision = '{asked}'" in note and f"set precision = '{used}'" in note
    else:
        assert note == ""


def test_unknown_precision_names_the_setting():
    with pytest.raises(PrecisionError, match=r"precision = 'fp8'.*fp32, bf16, fp16"):
        devices.resolve_precision("fp8", "cpu")


def test_cuda_bf16_means_native_bf16(monkeypatch):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return including_emulation  # a T4/V100: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    used, note = devices.resolve_precision("bf16", "cuda")
    assert (used, asked["emulation"]) == ("fp16", False) and "bf16" in note


def test_mps_bf16_needs_macos_14_and_torch_autocast(monkeypatch):
    monkeypatch.setattr(MpsOps, "autocast_supports", lambda self, dtype: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False, raising=False)
    assert devices.resolve_precision("bf16", "mps")[0] == "fp16"
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 14, raising=False)
    assert devices.resolve_precision("bf16", "mps") == ("bf16", "")
    monkeypatch.setattr(MpsOps, "autocast_supports", lambda self, dtype: dtype == torch.float32)
    assert devices.resolve_precision("fp16", "mps")[0] == "fp32"


def test_autocast_probe_reads_torch_not_a_table():
    assert devices.autocast_supports("cpu", torch.bfloat16)
    assert not devices.autocast_supports("cpu", torch.float64)  # torch disables autocast for it


# -- memory --------------------------------------------------------------------------------------------
def test_memory_per_device(monkeypatch, cuda_raises):
    cpu = devices.memory_info("cpu")
    assert cpu.free is None or 0 < cpu.free <= cpu.total
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * GiB, raising=False)
    mps = devices.memory_info(torch.device("mps"))
    assert mps.free is None and mps.total == 21 * GiB and "shares the system's memory" in mps.note
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device=None: (3 * GiB, 16 * GiB), raising=False)
    assert devices.memory_info("xpu:0") == MemoryInfo(3 * GiB, 16 * GiB)
    monkeypatch.delattr(torch.xpu, "mem_get_info", raising=False)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=16 * GiB))
    monkeypatch.setattr(torch.xpu, "memory_reserved", lambda d: 4 * GiB)
    older = devices.memory_info("xpu")
    assert (older.free, older.total) == (12 * GiB, 16 * GiB) and "reserved" in older.note


def test_cuda_memory_comes_from_mem_get_info(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GiB, 24 * GiB))
    assert devices.memory_info("cuda:0") == MemoryInfo(5 * GiB, 24 * GiB)

    def broken(device=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    info = devices.memory_info("cuda:0")
    assert info.free is None and "reports no memory figures" in info.note


def test_host_figures_say_what_they_mean():
    assert devices.host_memory_info("cuda:0", 5 * GiB, 24 * GiB) == MemoryInfo(5 * GiB, 24 * GiB, "")
    mps = devices.host_memory_info(torch.device("mps"), 30 * GiB, 64 * GiB)
    assert mps.free == 30 * GiB and "MPS shares the system's memory" in mps.note
    dml = devices.host_memory_info("privateuseone:0", GiB, None)
    assert dml.free is None and "no free-memory figure" in dml.note


def test_comfy_host_asks_comfyui_for_the_device_it_trains_on(monkeypatch):
    from comfyui_lora_trainer.nodes.host import ComfyHost

    asked = []
    for kind, free in (("mps", 30 * GiB), ("xpu", 6 * GiB), ("privateuseone", GiB)):
        device = torch.device(kind)
        mm = types.SimpleNamespace(
            get_torch_device=lambda d=device: d,
            get_torch_device_name=lambda d: f"{d} name",
            get_free_memory=lambda d, f=free: asked.append(d) or f,
            get_total_memory=lambda d: 64 * GiB,
        )
        comfy = types.ModuleType("comfy")
        comfy.model_management = mm
        monkeypatch.setitem(sys.modules, "comfy", comfy)
        monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
        memory = ComfyHost().device_memory()
        assert asked[-1] == device and memory["type"] == kind and memory["name"] == f"{kind} name"
        if kind == "privateuseone":
            assert memory["free"] is None and "no free-memory figure" in memory["note"]
        else:
            assert memory["free"] == free
    assert "MPS shares" in devices.host_memory_info("mps", 1, 2).note


def test_estimate_uses_the_device_figure_and_says_when_there_is_none():
    from comfyui_lora_trainer.nodes import estimate as est

    shape = est.ModelShape("sdxl", 2_600_000_000, 800_000_000, 80_000_000, 320, [(640, 640)] * 100)
    settings = est.Settings(1024, 1, 16, "bf16", steps=100)
    unknown = est.estimate(shape, settings, None, "mps", "mps", memory_note="MPS shares the system's memory")
    assert unknown.fits and "no free-memory figure: not checked" in unknown.summary()
    assert "MPS shares" in unknown.summary() and unknown.total_seconds is None  # no calibrated MPS figure
    # on MPS, as on the CPU, the text encoders and the VAE share the memory; on XPU they need not be counted
    xpu = est.estimate(shape, settings, None, "xpu", "xpu")
    assert unknown.peak_bytes > xpu.peak_bytes and "text_encoders_vae" in unknown.parts
    refused = est.estimate(shape, settings, 4 * GiB, "mps", "mps", memory_note="MPS shares the system's memory")
    assert not refused.fits
    message = est.refusal_message(refused)
    assert "mps has 4.0 GiB free" in message and "MPS shares the system's memory" in message


# -- shared paths never call torch.cuda for another device ---------------------------------------------
def test_shared_helpers_stay_off_cuda_for_other_devices(cuda_raises, monkeypatch):
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: None)
    monkeypatch.setattr(torch.xpu, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.xpu, "synchronize", lambda device=None: None)
    for name in ("cpu", "mps", "xpu:0"):
        devices.empty_cache(name)
        devices.synchronize(name)
        devices.memory_info(name)
        devices.pin_memory_available(name)
        devices.fused_adamw_available(name)
        devices.autocast_device_type(name)
        devices.describe(name)
        for precision in ("fp32", "bf16", "fp16"):
            devices.resolve_precision(precision, name)
    assert devices.generator("cpu", 5).initial_seed() == 5
    assert not devices.pin_memory_available("mps") and devices.pin_memory_available("xpu")


def test_fused_adamw_only_where_the_device_has_the_kernel(cuda_raises):
    from comfyui_lora_trainer.training.optim import make_optimizer

    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert make_optimizer("adamw", params, 1e-3, 0.0, device="cpu").defaults["fused"]
    for kind in ("mps", "xpu"):
        with devices.override(**{kind: FakeOps(kind, fused=False)}):
            assert not make_optimizer("adamw", params, 1e-3, 0.0, device=kind).defaults.get("fused")
    with devices.override(mps=FakeOps("mps", fused=True)):  # a torch that gains the kernel gets it
        assert make_optimizer("adamw", params, 1e-3, 0.0, device="mps").defaults["fused"]
    assert not devices.fused_adamw_available("mps") and not devices.fused_adamw_available("xpu")


def test_lora_dropout_draws_its_element_mask_from_the_device_generator(cuda_raises):
    from comfyui_lora_trainer.training.adapters import LoraDropout

    fake = FakeOps("cpu", label="CPU")
    with devices.override(cpu=fake):
        m = LoraDropout(network_dropout=0.5).mask(3, 7, (4, 8), False, torch.device("cpu"), torch.float32)
    assert fake.calls == ["generator"] and m.shape == (4, 8)
    again = LoraDropout(network_dropout=0.5).mask(3, 7, (4, 8), False, torch.device("cpu"), torch.float32)
    assert torch.equal(m, again)  # the real CPU generator draws the same mask from the same seed


def test_fp8_layers_read_the_autocast_dtype_of_their_device(cuda_raises):
    from comfyui_lora_trainer.training.base_options import _compute_dtype

    x = torch.zeros(2, 2)
    assert _compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compute_dtype(x) == torch.bfloat16
    assert devices.autocast_dtype("mps") is None


# -- end to end on the CPU: the node asked for fp16 ----------------------------------------------------
def test_node_with_fp16_on_the_cpu_trains_fp32_and_says_so(tmp_path, cuda_raises):
    from comfyui_lora_trainer.nodes.dataset import LoadDataset
    from comfyui_lora_trainer.nodes.train import TrainLoRA
    from comfyui_lora_trainer.training.models import tiny_tokenizer_dir, write_tiny_checkpoint
    from fake_host import FakeHost

    host = FakeHost(tmp_path, tiny_tokenizer_dir())
    write_tiny_checkpoint(host.checkpoint_path("tiny.safetensors"), family="sd1", seed=0)
    shutil.copytree(SAMPLE, os.path.join(host.input_directory(), "shapes"))
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    result = TrainLoRA.execute(host, checkpoint="tiny.safetensors", dataset=dataset, steps=2, learning_rate=1e-3,
                               rank=4, alpha=4.0, resolution=64, batch_size=2, seed=1, output_name="fp16_cpu",
                               precision="fp16")
    note = devices.resolve_precision("fp16", "cpu")[1]
    assert note and any(text == note for _, text in host.texts)  # the node's status line, before training
    assert note in result.ui["text"][0]  # and on the node when it is done
    with safe_open(os.path.join(host.loras_directory(), "fp16_cpu.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_mixed_precision"] == "no"  # what was really used
    assert meta[PRECISION_NOTE_KEY] == note  # and why: the node passed fp16 on, the backend decided


def test_a_training_step_on_the_cpu_makes_no_cuda_call(cuda_raises, tmp_path):
    """The whole shared path (device choice, accelerator, autocast, LoRA dropout's generators, the loss,
    export) with every device-specific torch.cuda call made to raise."""
    events = []
    with devices.override(cuda=FakeOps("cuda", available=False), xpu=FakeOps("xpu", available=False),
                          mps=FakeOps("mps", available=False)):
        result, base = tiny_run(device="auto", precision="bf16", steps=2, network_dropout=0.1, rank_dropout=0.1,
                           events=events.append, output_dir=str(tmp_path), output_name="cpu_only")
    start = next(e for e in events if e["type"] == "start")
    assert (start["device"], start["precision"], start["precision_note"]) == ("cpu", "bf16", "")
    assert result.steps_done == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(result.path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_mixed_precision"] == "bf16" and PRECISION_NOTE_KEY not in meta


def test_the_loop_trains_in_what_devices_decides_and_says_it_once():
    """A CPU whose autocast runs no bf16 (a fake one): the loop asks devices.plan, trains in fp32 and says
    so once, rather than deciding on the device type itself."""
    events = []
    with devices.override(cpu=FakeOps("cpu", bf16=False, fp16=False)):
        _, base = tiny_run(device="cpu", precision="bf16", steps=1, events=events.append)
    note = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("precision = ")]
    assert len(note) == 1 and "'bf16' is not supported" in note[0] and "fp32 instead" in note[0]
    assert base.unet.dtype == torch.float32
    start = next(e for e in events if e["type"] == "start")
    assert (start["precision"], start["precision_note"]) == ("fp32", note[0])


def test_the_precision_note_has_a_place_in_the_file_metadata():
    from comfyui_lora_trainer.training.formats.metadata import RunInfo, make_metadata

    used, note = devices.resolve_precision("fp16", "cpu")
    md = make_metadata(RunInfo(family="sd1", mixed_precision=devices.ACCELERATE_PRECISION[used],
                                precision_note=note or None))
    assert md["ss_mixed_precision"] == "no" and md[PRECISION_NOTE_KEY] == note
    assert PRECISION_NOTE_KEY not in make_metadata(RunInfo(family="sd1", mixed_precision="bf16"))


def test_plan_is_what_the_loop_needs_in_one_value():
    run = devices.plan("cpu", "fp16")
    assert (run.device, run.requested, run.precision, run.dtype) == (torch.device("cpu"), "fp16", "fp32", torch.float32)
    assert run.mixed_precision == "no" and run.note.startswith("precision = 'fp16'")
    assert run.accelerator_kwargs() == {"mixed_precision": "no", "cpu": True}
    with devices.override(cuda=FakeOps("cuda", bf16=False), xpu=FakeOps("xpu", available=False)):
        gpu = devices.plan("auto", "bf16")
    assert (gpu.device.type, gpu.precision, gpu.mixed_precision) == ("cuda", "fp16", "fp16")
    assert gpu.accelerator_kwargs() == {"mixed_precision": "fp16", "cpu": False}
    with devices.override(mps=FakeOps("mps")):
        assert devices.plan("mps", "bf16").note == ""
