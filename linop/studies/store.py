"""The one store of the studies: content hashes, atomic writes, resumable caches, JSONL logs.

Every study (verification, reconstruction, post-training) writes its results through this
module, so that the three share one answer to each of these questions:

* **What identifies an input?**  :func:`content_hash` — SHA-256 over a structural
  description of any object (tensors and arrays by dtype, shape and bytes; containers in
  order, mappings by sorted key; torch modules by ``repr`` and state dict; other objects by
  their attributes).  :func:`key_of` hashes a small JSON-able mapping of such digests and
  settings into the key a cache entry is filed under.
* **How is a file written?**  :func:`atomic_write_bytes` — through a uniquely named
  temporary file in the target directory and ``os.replace`` (atomic on POSIX): a reader or an
  interrupted run sees the old file or the new one, never half of one, and no temporary file
  is left behind on error.
* **When is a cached result reused?**  Only when the key stored *inside* the file equals the
  key of the current inputs (:func:`npz_has`, :func:`load_pt`); anything else — a missing,
  corrupt, foreign or stale file — is recomputed.
* **How does a long study resume?**  :func:`append_jsonl` appends one finished record per line
  (flushed and fsynced); :func:`read_jsonl` reads them back and drops a torn last line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import types
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import jsonable

__all__ = [
    "append_jsonl",
    "atomic_write_bytes",
    "content_hash",
    "key_of",
    "load_pt",
    "npz_has",
    "output_dir",
    "read_jsonl",
    "save_npz",
    "save_pt",
    "write_json",
]

#: objects hashed through their attributes are followed this deep (a network → its nodes →
#: their operators → the operators' parameters is four levels)
_MAX_DEPTH = 8


# ============================================================================ hashing
def _described_attrs(obj: Any) -> dict:
    """The attributes that describe ``obj``'s content.

    Memo attributes are left out: dataclass fields declared ``compare=False`` and the names
    a class lists in ``_memo_attrs``.  They are filled lazily on first use (an operator's
    structure, a node's local Jacobians), add no information, and would otherwise change the
    digest of an object after its first computation."""
    skip = set(getattr(type(obj), "_memo_attrs", ()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        skip |= {f.name for f in dataclasses.fields(obj) if not f.compare}
    return {k: v for k, v in vars(obj).items() if k not in skip}


def _update(h: Any, obj: Any, depth: int, seen: set[int]) -> None:
    """Feed a structural description of ``obj`` (tensors by value) into hash ``h``."""
    import torch

    h.update(type(obj).__name__.encode())
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes() if obj.dtype != object else repr(obj).encode())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, complex, np.generic, np.dtype,
                                         torch.dtype, slice)):
        h.update(repr(obj).encode())
    elif isinstance(obj, (list, tuple)):
        h.update(str(len(obj)).encode())
        for v in obj:
            _update(h, v, depth + 1, seen)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            if "cache" in str(k):  # lazily filled caches (e.g. Operator._param_cache) add no information
                continue
            h.update(str(k).encode())
            _update(h, obj[k], depth + 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType, types.MethodType,
                                                           types.ModuleType)):
        if id(obj) in seen or depth > _MAX_DEPTH:  # shared sub-objects are described once
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            h.update(repr(obj).encode())
            _update(h, dict(obj.state_dict()), depth + 1, seen)
        else:
            _update(h, _described_attrs(obj), depth + 1, seen)
    # functions, modules, …: the type name above is all that is used


def content_hash(*objs: Any, salt: str = "") -> str:
    """SHA-256 (hex) of the content of ``objs``, prefixed by ``salt`` (a format version).

    Tensors and arrays count by dtype, shape and bytes, so two objects with equal content
    hash equally however they were built, and a single changed bit changes the digest.

    Parameters
    ----------
    *objs : tensors, arrays, plain values, containers, torch modules (``repr`` + state dict)
        or objects described by their attributes (e.g. an ``EquivalentNetwork``).
    salt : str
        Mixed in first; a study bumps its version here to retire every old key at once.
    """
    h = hashlib.sha256(salt.encode())
    for obj in objs:
        _update(h, obj, 0, set())
    return h.hexdigest()


def key_of(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``fields`` as canonical JSON (sorted keys): the key a cache entry or
    a configuration is filed under.  ``fields`` holds digests and settings, not data."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()


# ============================================================================ writing
def output_dir(path: Any, name: str = "out_dir") -> Path:
    """``path`` as a study's output directory, created if missing.

    Raises ``ValueError`` naming ``name`` for an empty path (it would silently mean the
    current directory) or a non-path, and ``NotADirectoryError`` when ``path`` is an
    existing file (one line, not an uncaught ``FileExistsError`` from ``mkdir``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a directory path, got {type(path).__name__}")
    if str(os.fspath(path)).strip() == "":
        raise ValueError(f"{name} is empty; give the output directory explicitly (e.g. results/run1)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{name} {str(out)!r} is an existing file, not a directory; choose another path")
    for parent in out.parents:  # a file on the way makes mkdir fail with a confusing errno
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"{name} {str(out)!r}: {str(parent)!r} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set, then restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create the parent directory if needed.

    The bytes go to a uniquely named temporary file beside ``path`` (so concurrent writers
    never share one) that replaces ``path`` with ``os.replace``.  On any error the temporary
    file is removed and the old ``path``, if any, is left as it was.
    """
    path = Path(path)
    for attempt in (0, 1):  # a concurrent run may remove the directory in between (…partial/)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            break
        except FileNotFoundError:
            if attempt:
                raise
    try:
        # mkstemp creates 0600; a result file gets the mode a plain open() would give it
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """Atomically write ``obj`` as indented JSON (``linop.utils.jsonable``: numpy and torch
    values become plain numbers, inf / nan become strings, so the file is valid JSON)."""
    text = json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


# ============================================================================ caches
#: zlib level of the ``.npz`` caches: 1 deflates a verification's per-image file ~3× faster than
#: numpy's default (6) for ~7 % more bytes (measured on a VGG7 file: 2.9 vs 8.8 ms, 65 vs 61 kB) —
#: the file is written by the study's driver, which shares the cores with the workers
NPZ_LEVEL = 1


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """The bytes of a ``.npz`` of ``arrays`` in the format of ``np.savez_compressed``
    (``np.load`` reads it), deflated at :data:`NPZ_LEVEL`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=NPZ_LEVEL) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Atomically write :func:`npz_bytes` of ``arrays`` plus ``meta`` (JSON, under the name
    ``meta``; it carries the cache ``key`` :func:`npz_has` checks)."""
    return atomic_write_bytes(path, npz_bytes({"meta": np.array(json.dumps(jsonable(meta))), **arrays}))


def npz_has(path: str | os.PathLike, key: str, names: Iterable[str]) -> bool:
    """True when ``path`` is a readable ``.npz`` written for ``key`` holding every array of
    ``names``; a missing, corrupt, foreign or stale file gives False (it is recomputed)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            have = set(z.files)
    except Exception:  # any unreadable file is simply recomputed
        return False
    return isinstance(meta, dict) and meta.get("key") == key and set(names) <= have


#: the field of a .pt file written by :func:`save_pt` that holds the content hash of its payload
_CHECKSUM = "linop_sha256"


def save_pt(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` ``obj`` (tensors and plain containers) to ``path``, with the
    :func:`content_hash` of ``obj`` beside it, so :func:`load_pt` detects any damage (a
    flipped bit in a tensor, a torn file) instead of trusting it."""
    import torch

    buf = io.BytesIO()
    torch.save({_CHECKSUM: content_hash(obj, salt="pt"), "payload": obj}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_pt(path: str | os.PathLike, key: str | None = None) -> Any:
    """The object :func:`save_pt` wrote to ``path``; ``None`` — recompute — when the file is
    missing, unreadable, not written by :func:`save_pt`, fails its checksum, or (with ``key``)
    is not a mapping whose ``"key"`` equals ``key``.  Loaded with ``weights_only=True``."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
        obj = wrapped["payload"]
        if content_hash(obj, salt="pt") != wrapped[_CHECKSUM]:
            return None  # damaged content: never trusted
    except Exception:  # a torn, foreign or pre-checksum file is recomputed
        return None
    if key is not None and not (isinstance(obj, Mapping) and obj.get("key") == key):
        return None
    return obj


# ============================================================================ logs
def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], unique: Iterable[str] | None = None) -> bool:
    """Append ``record`` as one JSON line (sorted keys), flushed and fsynced, so a finished
    record survives a crash right after it.

    With ``unique`` (field names, e.g. ``("key", "config_hash")``), the file is locked
    (``fcntl.flock``) while it is checked and appended to, and the record is skipped when a
    record with the same values of those fields is already there: two runs on one output directory never write
    duplicate records.  Returns whether the record was written."""
    with open(path, "a+") as fh:
        if unique is not None:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            fields = tuple(unique)
            mine = tuple(record.get(f) for f in fields)
            fh.seek(0)
            for line in fh.read().splitlines():
                try:
                    if tuple(json.loads(line).get(f) for f in fields) == mine:
                        return False
                except (json.JSONDecodeError, AttributeError):
                    continue  # a torn line: read_jsonl deals with it
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file (``[]`` when it does not exist).

    A torn *last* line (the process was killed while appending) is dropped and the file is
    rewritten without it; a bad line elsewhere raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records, good = [], []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                atomic_write_bytes(path, "".join(g + "\n" for g in good).encode())
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; remove it or start afresh (resume=False)") from None
        good.append(line)
    return records
