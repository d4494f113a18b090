"""Finished products are verified when read: each product's size and sha256 go into its job's done record.

A product truncated or replaced after its job finished (a full disk, a partial copy, an edit) must not be reported
done nor loaded into a model: ``problem`` names the file, the job counts as not done, and ``monomod run`` runs it
(and, through the hashes, its dependents) again. Sizes are checked on every read (one ``stat``); a file's hash is
computed once per process for a given (size, mtime, inode).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_hashes: dict[tuple[str, int, int, int], str] = {}


def sha256(path: Path) -> str:
    """The file's sha256, cached for as long as its size, mtime and inode stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def describe(run_dir: Path, outputs: list[str]) -> dict[str, dict[str, int | str]]:
    """``{output: {"size", "sha256"}}`` for the outputs that are files (recorded when a job finishes)."""
    records = {}
    for out in outputs:
        path = run_dir / out
        if path.is_file():
            records[out] = {"size": path.stat().st_size, "sha256": sha256(path)}
    return records


def problem(run_dir: Path, outputs: list[str], records: dict | None) -> str | None:
    """None when every output exists and matches its record, else one line naming the first file that does not.

    A done record without a size and sha256 for an output (its product list lost or edited away) proves nothing:
    the job counts as not done, so ``monomod run`` runs it again rather than trusting a file nobody can check (a
    truncated product would otherwise read as done to ``plan show`` and ``run`` and fail in ``export``)."""
    for out in outputs:
        path = run_dir / out
        if not path.exists():
            return f"{path} is missing"
        record = records.get(out) if isinstance(records, dict) else None
        if not isinstance(record, dict):
            return f"its done record lists no size and sha256 for {path}"
        try:
            size = os.stat(path).st_size
        except OSError as e:
            return f"{path} cannot be read ({e.strerror})"
        if size != record.get("size"):
            return f"{path} has {size} bytes, {record.get('size')} when its job finished"
        if sha256(path) != record.get("sha256"):
            return f"{path} changed after its job finished (sha256 differs)"
    return None
