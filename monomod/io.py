"""Files that are never seen half-written: atomic replaces, and a JSONL reader that tolerates a torn last line.

The bottom of the package (it imports nothing of monomod). Every writer of RUN_DIR goes through here:

* ``atomic_write_bytes/text/json`` and ``atomic_save_tensors`` fill a uniquely named temporary sibling, fsync it and
  ``os.replace`` it into place, so a reader (here or on another node of a shared file system) sees the old file or
  the new one, never a torn one, and two writers never share a temporary file;
* ``append_jsonl`` / ``read_jsonl`` are the log format of training metrics: a writer killed mid-line leaves a torn
  last line, which readers skip;
* ``clean_temporaries`` removes what killed writers left behind (only while no writer is at work there).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from safetensors.torch import save_file


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it are durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unique_sibling(path: Path, kind: str) -> Path:
    """A hidden sibling ``.{name}.{kind}-{pid}-{random}`` of ``path``: the scratch name of one writer."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# The temporary siblings ``unique_sibling(path, "tmp")`` makes, and the staging folders of reused runs.
_TEMPORARY = re.compile(r"\..+\.(tmp-[0-9]+-[0-9a-f]{8}|reuse)")


def clean_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files and folders that writers killed mid-write left under ``root``.

    Only safe while no writer is at work there (``execute`` calls it holding RUN_DIR's lock). Aside copies of
    checkpoints (``.old-``) are kept: they may be the last complete checkpoint."""
    removed = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if _TEMPORARY.fullmatch(name):
                path = Path(dirpath) / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        dirnames[:] = [d for d in dirnames if not _TEMPORARY.fullmatch(d)]
    return removed


def atomic_replace(path: Path | str, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary sibling of ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_sibling(path, "tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON (with a trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically."""
    prepared = owned_cpu_tensors(tensors)
    atomic_replace(path, lambda tmp: save_file(prepared, str(tmp)))


def owned_cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that own their storage (safetensors refuses shared or partial storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh copy: owns its storage
        else:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            owns_all = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
            if not owns_all or (ptr in seen and t.nbytes > 0):
                t = t.contiguous().clone()
            else:
                seen.add(ptr)
        out[name] = t
    return out


def read_json(path: Path | str) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a reader never fails on a writer's file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def append_jsonl(stream: TextIO, record: dict[str, Any]) -> None:
    """One record as one line, flushed so a reader of the file sees it at once."""
    stream.write(json.dumps(record) + "\n")
    stream.flush()


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Every complete record of a JSONL file; a torn or foreign line (a writer killed mid-line) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [record for record in map(_record, text.splitlines()) if record is not None]


def last_jsonl(path: Path | str, tail_bytes: int = 4096) -> dict[str, Any] | None:
    """The last complete record of a JSONL file, reading only its tail (cheap enough for a live progress board)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        record = _record(line)
        if record is not None:
            return record
    return None


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
