"""Immutable, verifiable artifact versions: ``OUTPUT/artifacts/v1``, ``v2``, ... and a pointer.

    OUTPUT/artifacts/v3/   manifest.json (+ a sha256 per file, the release: number, parent, changes,
                           scores), experts/, router/, universal/, tokenizer/, serve.json
    OUTPUT/artifact ->     artifacts/v3 (a symlink; `loramix serve OUTPUT/artifact` keeps working)

A version is written under a temporary name and renamed into place whole, then the pointer is
switched with one atomic rename; nothing ever modifies a version once written. Loading a
version checks every file against its manifest (:func:`verify`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from loramix.artifact import read_json, write_json

logger = logging.getLogger(__name__)

ARTIFACTS = "artifacts"
POINTER = "artifact"
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A version that is missing, changed or truncated (the message names the file)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` but the manifest itself."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {rel: sha256(root / rel) for rel in rels if rel != MANIFEST}


def verify(root: str | Path) -> None:
    """Check every file a manifest lists (a manifest without a file table is not checked).

    Raises:
        ArtifactError: naming the first file that is missing, changed or truncated.
    """
    root = Path(root)
    files = read_json(root / MANIFEST).get("files")
    if not files:
        return
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{str(path)!r} is missing from the artifact; restore it or publish a new version.")
        if sha256(path) != want:
            raise ArtifactError(
                f"{str(path)!r} does not match the artifact's manifest (changed or truncated since it was "
                "written); restore it, or serve another version (`loramix versions`)."
            )


def versions_dir(output: str | Path) -> Path:
    return Path(output) / ARTIFACTS


def numbers(output: str | Path) -> list[int]:
    root = versions_dir(output)
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit())


def current(output: str | Path) -> int | None:
    """The version ``OUTPUT/artifact`` points at (None without one)."""
    pointer = Path(output) / POINTER
    if not pointer.is_symlink():
        return None
    name = Path(os.readlink(pointer)).name
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else None


def path_of(output: str | Path, number: int) -> Path:
    path = versions_dir(output) / f"v{number}"
    if not path.is_dir():
        have = ", ".join(f"v{n}" for n in numbers(output)) or "none"
        raise ArtifactError(f"{str(Path(output))!r} has no version {number} (it has {have}).")
    return path


def resolve(path: str | Path, version: int | None = None) -> Path:
    """A run folder, a version folder or the ``artifact`` pointer -> the concrete version folder.

    ``version``: that version of the run (default: the one the pointer names).
    """
    path = Path(path)
    if version is not None:
        run = path if (path / ARTIFACTS).is_dir() else path.resolve().parent.parent
        return path_of(run, version).resolve()
    if (path / MANIFEST).is_file():
        return path.resolve()
    if (path / POINTER / MANIFEST).is_file():
        return (path / POINTER).resolve()
    raise ArtifactError(
        f"{str(path)!r} is neither a mixture artifact (manifest.json) nor a run folder with one; "
        "pass OUTPUT, OUTPUT/artifact or OUTPUT/artifacts/vN."
    )


def _digest_of(table: dict[str, str]) -> str:
    return hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(table.items())).encode()).hexdigest()


def changes(parent: dict | None, table: dict[str, str]) -> dict:
    """What a new version changes against its parent's file table: experts added / removed /
    replaced, the router retrained."""
    old = (parent or {}).get("files", {})

    def experts(files):
        found = {}
        for rel, digest in files.items():
            if rel.startswith("experts/"):
                found.setdefault(rel.split("/")[1], []).append(digest)
        return {k: sorted(v) for k, v in found.items()}

    before, after = experts(old), experts(table)
    router = lambda files: sorted(v for k, v in files.items() if k.startswith(("router/", "universal/")))  # noqa: E731
    return {
        "experts_added": sorted(set(after) - set(before)),
        "experts_removed": sorted(set(before) - set(after)),
        "experts_replaced": sorted(n for n in set(after) & set(before) if after[n] != before[n]),
        "router_retrained": router(old) != router(table),
    }


def publish(
    output: str | Path, staged: str | Path, *, extra: dict | None = None, scores: dict | None = None, note: str = ""
) -> int:
    """Make ``staged`` (a saved mixture with its tokenizer) plus the JSON files in ``extra``
    (``{"serve.json": {...}}``) the next version and point ``OUTPUT/artifact`` at it; returns its
    number. Contents identical to the current version's publish nothing (a rerun)."""
    output, staged = Path(output), Path(staged)
    parent = current(output)
    parent_manifest = read_json(path_of(output, parent) / MANIFEST) if parent is not None else None
    number = max(numbers(output), default=0) + 1
    root = versions_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".v{number}.tmp"))
    try:
        shutil.copytree(staged, tmp, dirs_exist_ok=True)
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        table = file_table(tmp)
        if parent_manifest is not None and _digest_of(parent_manifest.get("files", {})) == _digest_of(table):
            shutil.rmtree(tmp)
            set_pointer(output, parent)
            return parent
        manifest = read_json(tmp / MANIFEST)
        manifest["release"] = {
            "version": number,
            "parent": parent,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "changes": changes(parent_manifest, table),
            "scores": scores or {},
            "note": note,
        }
        manifest["files"] = table
        write_json(tmp / MANIFEST, manifest)
        os.rename(tmp, root / f"v{number}")  # a version appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_pointer(output, number)
    logger.info("published %s", root / f"v{number}")
    return number


def set_pointer(output: str | Path, number: int) -> None:
    """Point ``OUTPUT/artifact`` at version ``number`` with one atomic rename."""
    output = Path(output)
    path_of(output, number)
    pointer = output / POINTER
    if pointer.exists() and not pointer.is_symlink():  # a folder written before versions existed
        legacy = versions_dir(output) / f"legacy-{int(time.time())}"
        os.rename(pointer, legacy)
        logger.warning("moved the pre-versions artifact folder to %s", legacy)
    tmp = output / f".{POINTER}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(Path(ARTIFACTS) / f"v{number}", tmp)
    os.replace(tmp, pointer)


def listing(output: str | Path) -> list[dict]:
    """One row per version: number, date, experts, avg exact match, router accuracy, current or not."""
    rows, now = [], current(output)
    for n in numbers(output):
        manifest = read_json(path_of(output, n) / MANIFEST)
        release = manifest.get("release", {})
        scores = release.get("scores", {})
        rows.append(
            {
                "version": n,
                "created": release.get("created"),
                "parent": release.get("parent"),
                "experts": manifest["expert_names"],
                "exact_match": scores.get("exact_match"),
                "router_accuracy": scores.get("router_accuracy"),
                "changes": release.get("changes", {}),
                "current": n == now,
            }
        )
    return rows
