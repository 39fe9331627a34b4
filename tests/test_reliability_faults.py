"""Issue 7, faults: cancel + resume, SIGKILL while saving, disk full / read-only folder, NaN mid-run.

What each test simulates is said in its docstring; where a real fault can be produced (a SIGKILLed
process, a full tmpfs, a read-only bind mount) the test produces it, and falls back to an injected
OSError only where it says so.
"""

import errno
import glob
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from comfyui_lora_trainer.nodes import host as host_module
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.formats import LoraWeights, save_lora_file
from comfyui_lora_trainer.training.formats import safetensors_io
from comfyui_lora_trainer.training.formats.safetensors_io import cleanup_stale_temp_files
from comfyui_lora_trainer.training.loop import TrainingError, train
from comfyui_lora_trainer.training.models import load_base_model, tiny_tokenizer_dir

from fake_host import FakeHost

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def config_for(checkpoint, out, **over):
    values = dict(checkpoint=checkpoint, tokenizer=tiny_tokenizer_dir(), dataset=SAMPLE, output_dir=str(out),
                  output_name="fault", steps=6, rank=2, alpha=2.0, learning_rate=2e-3, resolution=64, batch_size=2,
                  seed=5, device="cpu")
    values.update(over)
    return TrainConfig(**values)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def small_lora(scale=1.0, size=64) -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(4, size, generator=g) * scale,
        "lora_unet_a.lora_up.weight": torch.randn(size, 4, generator=g) * scale,
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    return LoraWeights(tensors=tensors, metadata={"ss_network_dim": "4"}, family="sd1")


# -- cancel at a random step, then resume ---------------------------------------------------------


@pytest.mark.slow
def test_cancel_at_a_random_step_then_resume_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    """Stop after a random step k (what Cancel does), resume from the state saved on stop: the final LoRA
    and the loss history equal those of a run that was never interrupted, bitwise on the CPU."""
    steps = 6
    k = random.randrange(1, steps)
    whole = train(config_for(tiny_checkpoint, tmp_path / "whole", steps=steps))

    out = tmp_path / "cut"
    done = []
    cut = train(config_for(tiny_checkpoint, out, steps=steps, save_state_on_stop=True),
                events=lambda e: done.append(e["step"]) if e["type"] == "step" else None,
                should_stop=lambda: len(done) >= k)
    assert cut.stopped_early and cut.steps_done == k, (k, cut.steps_done)
    assert cut.state_path and os.path.isfile(cut.state_path), f"no resumable state after cancel at step {k}"
    assert os.path.isfile(out / f"fault_interrupted_step{k}.safetensors")

    resumed = train(config_for(tiny_checkpoint, out, steps=steps, resume_from=cut.state_path))
    assert resumed.steps_done == steps
    assert resumed.losses == whole.losses, f"cancelled at step {k}"
    assert resumed.lora.tensors.keys() == whole.lora.tensors.keys()
    different = [n for n in whole.lora.tensors if not torch.equal(whole.lora.tensors[n], resumed.lora.tensors[n])]
    assert not different, f"cancelled at step {k}: {len(different)} tensors differ, e.g. {different[:3]}"


# -- SIGKILL while saving -------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from comfyui_lora_trainer.training.formats import LoraWeights, save_lora_file
    from comfyui_lora_trainer.training.formats import safetensors_io

    target, phase, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    real_open = open

    class HalfThenHang:
        # writes half the bytes, makes them reach the disk, then hangs: the kill lands mid-write
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno())
            print("WRITING", flush=True); time.sleep(600)
        def __getattr__(self, name):
            return getattr(self.f, name)

    if phase == "mid-write":
        safetensors_io.open = lambda path, mode="r", *a, **k: HalfThenHang(real_open(path, mode, *a, **k))
    else:  # "before-rename": every byte is in the temp file, the process dies before it is published
        def hang(fd):
            real_fsync(fd); print("WRITING", flush=True); time.sleep(600)
        real_fsync = os.fsync
        safetensors_io.os = type(sys)("os_patched")
        safetensors_io.os.__dict__.update(os.__dict__)
        safetensors_io.os.fsync = hang

    g = torch.Generator().manual_seed(1)
    big = {f"lora_unet_m{i}.lora_down.weight": torch.randn(64, 4096, generator=g) for i in range(16)}  # 16 MiB
    big.update({f"lora_unet_m{i}.lora_up.weight": torch.randn(4096, 64, generator=g) for i in range(16)})
    big.update({f"lora_unet_m{i}.alpha": torch.tensor(64.0) for i in range(16)})
    save_lora_file(target, LoraWeights(big, {}, "sd1"), overwrite=overwrite)
    print("SAVED", flush=True)
""")


def kill_while_saving(target, phase, overwrite=False):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), phase, "1" if overwrite else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", (line, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["mid-write", "before-rename"])
def test_sigkill_while_saving_leaves_no_partial_lora_and_the_next_start_cleans_up(tmp_path, phase):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    kept = save_lora_file(loras / "kept.safetensors", small_lora())
    kept_digest = digest(kept)
    kill_while_saving(loras / "new.safetensors", phase)

    names = sorted(os.listdir(loras))
    assert "new.safetensors" not in names  # no partial file under the real name
    leftovers = [n for n in names if n not in ("kept.safetensors",)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".new.safetensors.tmp-"), names
    assert digest(kept) == kept_digest
    # ComfyUI lists models/loras without dot files: the leftover is never offered as a LoRA
    assert all(n.startswith(".") for n in leftovers)

    # the next start of the package (ComfyUI loading the extension) removes leftovers older than a minute
    old = time.time() - 3600
    os.utime(loras / leftovers[0], (old, old))
    fresh = loras / ".other.safetensors.tmp-0123456789abcdef"  # a save in progress elsewhere: left alone
    fresh.write_bytes(b"x")
    host = FakeHost(tmp_path, tiny_tokenizer_dir())
    host_module.set_host(host)
    try:
        host_module.clean_stale_saves_at_start()
    finally:
        host_module.set_host(None)
    assert sorted(os.listdir(loras)) == [fresh.name, "kept.safetensors"]
    assert digest(kept) == kept_digest


def test_sigkill_while_overwriting_keeps_the_previous_file(tmp_path):
    target = tmp_path / "same.safetensors"
    save_lora_file(target, small_lora())
    before = digest(target)
    kill_while_saving(target, "mid-write", overwrite=True)
    assert digest(target) == before
    assert load_file(str(target))["lora_unet_a.alpha"].item() == 4.0
    assert cleanup_stale_temp_files(tmp_path, min_age_s=0) and os.listdir(tmp_path) == ["same.safetensors"]


def test_cleanup_also_removes_interrupted_training_state_temps(tmp_path):
    """Earlier versions wrote training states through tempfile.mkstemp(prefix=".tmp_", suffix=".pt")."""
    leftover = tmp_path / ".tmp_ab12_x9z.pt"
    leftover.write_bytes(b"partial")
    keep = tmp_path / "mine_state_step4.pt"
    keep.write_bytes(b"state")
    user = tmp_path / ".tmp_notes.txt"
    user.write_bytes(b"not ours")
    assert cleanup_stale_temp_files(tmp_path, min_age_s=0) == [str(leftover)]
    assert sorted(os.listdir(tmp_path)) == [".tmp_notes.txt", "mine_state_step4.pt"]


def test_a_failed_state_save_leaves_the_previous_state_and_no_temp(tmp_path, monkeypatch):
    from comfyui_lora_trainer.training import state as state_module

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    path = str(tmp_path / "run_state_step2.pt")
    args = dict(models={"unet": model}, optimizer=opt, lr_scheduler=sched, extra={}, config={})
    state_module.save_state(path, step=2, **args)
    before = digest(path)
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        state_module.save_state(path, step=4, **args)
    assert os.listdir(tmp_path) == ["run_state_step2.pt"] and digest(path) == before


def test_train_node_cleans_leftovers_before_training(host):
    from comfyui_lora_trainer.nodes.dataset import LoadDataset
    from comfyui_lora_trainer.nodes.train import TrainLoRA

    stale = os.path.join(host.loras_directory(), ".crashed.safetensors.tmp-00000000deadbeef")
    with open(stale, "wb") as f:
        f.write(b"half a lora")
    os.utime(stale, (time.time() - 3600,) * 2)
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    TrainLoRA.execute(host, checkpoint="tiny.safetensors", dataset=dataset, steps=1, learning_rate=1e-3, rank=2,
                      alpha=2.0, resolution=64, batch_size=1, seed=0, output_name="after_crash", precision="fp32")
    assert sorted(os.listdir(host.loras_directory())) == ["after_crash.safetensors"]


# -- write errors ---------------------------------------------------------------------------------


def _mount(args, target) -> bool:
    if os.geteuid() != 0 or not os.path.exists("/bin/mount"):
        return False
    return subprocess.run(["mount", *args, str(target)], capture_output=True).returncode == 0


def _umount(target):
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_on_a_real_tiny_tmpfs(tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs holding one small LoRA, then a 1 MiB one (needs root to mount;
    skipped otherwise; the injected variant below always runs)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=256k", "tmpfs"], folder):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        kept = save_lora_file(folder / "kept.safetensors", small_lora())
        kept_digest = digest(kept)
        with pytest.raises(OSError) as info:
            save_lora_file(folder / "big.safetensors", small_lora(size=32768))  # 2 x 512 KiB of fp32
        assert info.value.errno == errno.ENOSPC
        assert "big.safetensors" in str(info.value) and "free some space" in str(info.value)
        assert os.listdir(folder) == ["kept.safetensors"]  # no partial file, no temp file
        assert digest(kept) == kept_digest
        with pytest.raises(OSError):
            save_lora_file(folder / "kept.safetensors", small_lora(size=32768), overwrite=True)
        assert digest(kept) == kept_digest  # a failed overwrite leaves the old file
    finally:
        _umount(folder)


def test_read_only_folder_via_a_read_only_bind_mount(tmp_path):
    """chmod does not stop root, so the folder is made read-only with a read-only bind mount
    (skipped where mounting is not allowed)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    kept = save_lora_file(folder / "kept.safetensors", small_lora())
    kept_digest = digest(kept)
    if not _mount(["--bind", str(folder)], folder):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _mount(["-o", "remount,ro,bind"], folder):
            pytest.skip("cannot remount read-only here")
        for name, overwrite in (("new.safetensors", False), ("kept.safetensors", True)):
            with pytest.raises(OSError) as info:
                save_lora_file(folder / name, small_lora(2.0), overwrite=overwrite)
            assert info.value.errno == errno.EROFS and name in str(info.value)
        assert os.listdir(folder) == ["kept.safetensors"] and digest(kept) == kept_digest
    finally:
        _umount(folder)


def test_disk_full_injected_at_fsync_during_training(tiny_checkpoint, tmp_path, monkeypatch):
    """Injected, not real: os.fsync in the LoRA writer raises ENOSPC (as a full disk reports it at
    flush time). The run fails with an error naming the file; earlier files in the folder are intact."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = save_lora_file(out / "earlier.safetensors", small_lora())
    earlier_digest = digest(earlier)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    patched = type(sys)("os_with_full_disk")
    patched.__dict__.update(os.__dict__)
    patched.fsync = full
    monkeypatch.setattr(safetensors_io, "os", patched)
    with pytest.raises(OSError, match=r"fault\.safetensors.*No space left") as info:
        train(config_for(tiny_checkpoint, out, steps=2))
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(out)) == ["earlier.safetensors"]
    assert digest(earlier) == earlier_digest


# -- NaN mid-run ----------------------------------------------------------------------------------


def test_nan_mid_run_stops_naming_the_step_and_keeps_the_last_good_save(tiny_checkpoint, tmp_path):
    """The LoRA weights are poisoned with NaN after step 5 (through the base model the test passed in),
    so step 6's loss is NaN. The run stops naming step 6 and the periodic save of step 4 stays intact."""
    base = load_base_model(tiny_checkpoint, tiny_tokenizer_dir())
    out = tmp_path / "out"

    def poison(event):
        if event["type"] == "step" and event["step"] == 5:
            with torch.no_grad():
                for name, p in base.unet.named_parameters():
                    if "lora_" in name:
                        p.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 6") as info:
        train(config_for(tiny_checkpoint, out, steps=10, save_every_n_steps=2), base=base, events=poison)
    saved = sorted(glob.glob(str(out / "*.safetensors")))
    assert [os.path.basename(p) for p in saved] == ["fault_step2.safetensors", "fault_step4.safetensors"]
    assert "fault_step4.safetensors" in str(info.value)  # the error points at the last good save
    for path in saved:
        tensors = load_file(path)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # nothing half-written
