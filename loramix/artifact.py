"""Files on disk: atomic writes and JSON manifests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def write_json(path: str | Path, data: object) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(f.name, path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing.")
    with open(path) as f:
        return json.load(f)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fingerprint(*parts: object) -> str:
    """Stable hash of JSON-able parts (pydantic models are dumped first)."""

    def plain(p):
        return p.model_dump(mode="json") if hasattr(p, "model_dump") else p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | Path | None) -> str | None:
    """Content hash of a file or a directory tree (``None`` for no path).

    Every file's relative name and its bytes enter length-prefixed, so two different file sets
    can never hash alike by shifting bytes between a name and a neighbour's contents.
    """

    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist. Check the path in `data.domains`.")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        name = str(f.relative_to(path) if f != path else f.name).encode()
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def tree_stamp(path: str | Path) -> str:
    """A cheap fingerprint of a file or folder: every file's name, size and modification time.

    For inputs too large to hash on every run (a base model's weights): a folder rewritten in
    place gets a new stamp, a copy with the same bytes too (which only costs a rerun).
    """

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = [
        (str(f.relative_to(path) if f != path else f.name), f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


class StageStore:
    """``OUTPUT/stages/<name>.json`` markers: a stage whose input hash matches is skipped.

    A marker vouches for its stage's output files by their content digest: a marker whose files
    changed or vanished (a crash while a rerun rewrote them, a hand edit) vouches for nothing.
    A runner also drops the marker before a stage rewrites its outputs (:meth:`invalidate`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root) / "stages"

    def _path(self, name: str) -> Path:
        return self.root / (name.replace("/", "__") + ".json")

    def done(self, name: str, digest: str) -> dict | None:
        path = self._path(name)
        if not path.is_file():
            return None
        marker = read_json(path)
        if marker.get("hash") != digest:
            return None
        for out, want in marker.get("outputs", {}).items():
            if not Path(out).exists() or file_digest(out) != want:
                logger.warning("stage %s: %s changed since it was written; running the stage again", name, out)
                return None
        return marker["result"]

    def mark(self, name: str, digest: str, result: dict, outputs: list[str] = ()) -> None:
        """Record a finished stage, with the digest of each output path it vouches for."""
        stamps = {str(o): file_digest(o) for o in outputs}
        write_json(self._path(name), {"hash": digest, "result": result, "outputs": stamps})

    def invalidate(self, name: str) -> None:
        """Forget a stage before it rewrites its outputs (a crash then leaves no marker behind)."""
        self._path(name).unlink(missing_ok=True)
