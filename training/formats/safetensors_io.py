"""Atomic safetensors writing with the ``sshs_*`` hashes that A1111/Civitai read (docs/lora-format.md §10).

* ``sshs_model_hash``: sha256 of the tensor-data section (everything after the 8-byte header length
  and the JSON header) of the bytes written.
* ``sshs_legacy_hash``: first 8 hex digits of sha256 of the 64 KiB at file offset 1 MiB of the file
  written (sha256 of b"" when the file is shorter than 1 MiB, as kohya computes it).

The header is built here (tensor entries taken from ``safetensors.torch.save``), with the two hash
values first in ``__metadata__``; they are fixed-width hex, so inserting them does not move any byte
of the file and both hashes describe exactly the final file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import struct
import time

import torch

from .kohya import ALPHA, LoraWeights

MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000

# save_lora_file's temp files, and training/state.py's (tempfile.mkstemp(prefix=".tmp_", suffix=".pt"))
_TMP_RE = re.compile(r"^(\..+\.tmp-[0-9a-f]{16}|\.tmp_[a-z0-9_]{8}\.pt)$")

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key in ("none", "", "default"):
        return None
    if key not in _DTYPES:
        raise ValueError(f"Unsupported save dtype {dtype!r}; use one of fp16, bf16, fp32.")
    return _DTYPES[key]


def _prepare_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LoRA tensor {k!r} is a {type(t).__name__}, not a torch.Tensor.")
        t = t.detach().to("cpu")
        if k.endswith(ALPHA):
            t = t.to(torch.float32)  # alpha stays a 0-dim float32 regardless of save precision
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().clone()
    return out


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _build(metadata: dict[str, str], tensor_entries: dict, data: bytes) -> bytes:
    header = {"__metadata__": metadata, **tensor_entries}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # align the data section, as safetensors does
    return struct.pack("<Q", len(hb)) + hb + data


def legacy_hash_of_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_SIZE]).hexdigest()[:8]


def model_hash_of_file(path) -> str:
    """sha256 of the tensor-data section of a safetensors file (sshs_model_hash / Civitai AutoV3)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash_of_file(path) -> str:
    """First 8 hex of sha256 of the 64 KiB at offset 1 MiB (sshs_legacy_hash)."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]


def serialize_lora(weights: LoraWeights, dtype=None) -> bytes:
    """The exact bytes ``save_lora_file`` writes (metadata + sshs_* hashes + tensors)."""
    from safetensors.torch import save as st_save

    tensors = _prepare_tensors(weights.tensors, _resolve_dtype(dtype))
    if not tensors:
        raise ValueError("Refusing to write a LoRA file with no tensors.")
    entries, data = _split(st_save(tensors))
    entries.pop("__metadata__", None)

    meta_in = {}
    for k, v in (weights.metadata or {}).items():
        if k in (MODEL_HASH_KEY, LEGACY_HASH_KEY) or v is None:
            continue
        meta_in[str(k)] = v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))

    model_hash = hashlib.sha256(data).hexdigest()
    placeholder = {MODEL_HASH_KEY: model_hash, LEGACY_HASH_KEY: "0" * 8}
    blob = _build({**placeholder, **meta_in}, entries, data)
    hlen = struct.unpack("<Q", blob[:8])[0]
    if hlen >= LEGACY_OFFSET:
        # The hash value sits at the very start of the header (first metadata key), far below
        # 1 MiB, so it is never inside the hashed window; check anyway.
        pos = blob.find(b'"' + LEGACY_HASH_KEY.encode() + b'":"')
        if pos < 0 or pos + 64 >= LEGACY_OFFSET:
            raise RuntimeError("Could not place sshs_legacy_hash outside the hashed window.")
    legacy = legacy_hash_of_bytes(blob)
    final = _build({MODEL_HASH_KEY: model_hash, LEGACY_HASH_KEY: legacy, **meta_in}, entries, data)
    if len(final) != len(blob) or legacy_hash_of_bytes(final) != legacy:  # pragma: no cover - invariant
        raise RuntimeError("Internal error: header length changed while inserting hashes.")
    return final


def temp_path_for(path: str) -> str:
    """``.<name>.tmp-<16 hex>`` next to ``path``: a dot file (ComfyUI lists no dot files) that
    :func:`cleanup_stale_temp_files` removes when an interrupted write leaves it behind."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")


def publish_atomically(tmp: str, path: str, overwrite: bool = False) -> None:
    """Make the complete file ``tmp`` (same folder, already fsynced) appear as ``path`` in one step.

    ``overwrite``: ``os.replace``. Otherwise no clobber: ``os.link(tmp, path)`` fails with FileExistsError
    when ``path`` exists, even if it appeared a moment ago, then ``tmp`` is unlinked. On a file system
    without hard links (``link`` raises another OSError: FAT/exFAT, some network shares) the fallback
    checks that ``path`` does not exist and renames (best effort: not race-free). ``tmp`` is left to the
    caller when this raises.
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def write_atomically(path, write, overwrite: bool = False) -> str:
    """Write a file so that it appears complete or not at all; returns its absolute path.

    ``write(tmp)`` writes the content to a temp file next to ``path`` (:func:`temp_path_for`); it is
    fsynced, published with :func:`publish_atomically` and the folder fsynced. On any failure
    (exception, disk full, ``path`` exists without ``overwrite``: FileExistsError) the temp file is
    removed and an existing ``path`` is unchanged.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish_atomically(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return path


def save_lora_file(path, weights: LoraWeights, overwrite: bool = False, dtype=None) -> str:
    """Write ``weights`` to ``path`` atomically; returns the absolute path written.

    The file appears complete or not at all (:func:`write_atomically`: the bytes go to
    ``.<name>.tmp-<random>`` in the same folder, are fsynced, then published). An existing ``path``
    raises FileExistsError unless ``overwrite=True``. ``dtype`` (torch dtype or "fp16"/"bf16"/"fp32")
    casts the up/down weights; alphas stay float32. The header gets ``sshs_model_hash`` /
    ``sshs_legacy_hash`` of the bytes written.
    """
    path = os.path.abspath(os.fspath(path))
    exists = f"LoRA file {path!r} already exists; choose another name or enable overwrite."
    if os.path.isdir(path):
        raise IsADirectoryError(f"Cannot save the LoRA to {path!r}: it is a folder; give a file name.")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(exists)
    blob = serialize_lora(weights, dtype=dtype)

    def write(tmp):
        with open(tmp, "xb") as f:
            f.write(blob)

    try:
        return write_atomically(path, write, overwrite)
    except FileExistsError:
        raise FileExistsError(exists) from None
    except OSError as e:
        # disk full, read-only folder, quota...: say which file and that nothing was replaced
        raise OSError(
            e.errno,
            f"Cannot write the LoRA file {path!r}: {e.strerror or e}. Nothing was written and any existing "
            "file of that name is unchanged; free some space or choose a writable folder.",
        ) from e


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cleanup_stale_temp_files(directory, min_age_s: float = 60.0) -> list[str]:
    """Delete leftover ``.<name>.tmp-<16 hex>`` files from interrupted saves in ``directory``.

    Only files at least ``min_age_s`` old are removed, so a save in progress elsewhere is left
    alone. Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    now = time.time()
    for n in names:
        if not _TMP_RE.match(n):
            continue
        p = os.path.join(directory, n)
        try:
            if not os.path.isfile(p) or now - os.path.getmtime(p) < min_age_s:
                continue
            os.unlink(p)
            removed.append(p)
        except OSError:
            continue
    return removed
