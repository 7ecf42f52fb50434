"""Artifact folders: atomic writing, the manifest, and verified loading.

An artifact folder holds ``model.onnx`` (+ ``model.onnx.data``), the tokenizer/config files and
``manifest.json``: recipe, tool and dependency versions, sha256 and size of every file,
per-layer formats, bits per weight, calibration summary and reference metrics.
Folders are written under a temporary name next to the destination and renamed into place at
the end, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_DEPENDENCIES = ("torch", "transformers", "onnx", "onnxruntime", "optimum-onnx", "numpy", "safetensors")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """Tool, dependency and platform versions recorded in every manifest."""
    from . import __version__

    deps = {}
    for name in _DEPENDENCIES:
        try:
            deps[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            deps[name] = None
    return {
        "edgecompress": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "dependencies": deps,
    }


@contextlib.contextmanager
def atomic_folder(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``dest`` only if the block completes.

    Refuses an existing ``dest`` unless ``force``; on any exception (Ctrl-C included) the
    temporary folder is removed and ``dest`` is left exactly as it was.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise ArtifactError(f"output folder {dest} already exists",
                            hint="choose another output folder, or pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add file hashes/sizes and environment to ``manifest`` and write ``manifest.json``."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(folder))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    full = {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        **manifest,
        "files": files,
        "size_bytes": sum(f["bytes"] for f in files.values()),
    }
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
    return full


def update_manifest(folder: Path, manifest: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Rewrite ``manifest.json`` with ``fields`` added; the files (and their hashes) are unchanged."""
    full = {**manifest, **fields}
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
    return full


@dataclass
class Artifact:
    """A verified artifact folder."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Artifact:
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise ArtifactError(f"artifact folder {path} does not exist",
                                hint="pass a folder written by `edgecompress run` (e.g. out/<recipe>/<export>)")
        if not mpath.is_file():
            inner = sorted(p.parent.name for p in path.glob(f"*/{MANIFEST}"))
            hint = (f"this looks like a run folder; pass one of its artifacts: {', '.join(inner)}" if inner
                    else "an artifact folder contains manifest.json")
            raise ArtifactError(f"{path} has no {MANIFEST}", hint=hint)
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{mpath} is not valid JSON: {e}") from None
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    def verify(self) -> None:
        """Check every file listed in the manifest exists with its recorded size and sha256."""
        for rel, info in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                raise ArtifactError(f"{p} is missing from the artifact", hint="re-run the export")
            if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
                raise ArtifactError(f"{p} does not match the sha256 in {MANIFEST} (corrupt or modified)",
                                    hint="re-run the export, or pass --no-verify to load it anyway")

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.get("onnx", {}).get("model", "model.onnx")

    @property
    def format(self) -> str:
        """``onnx``, or ``tvm`` for a compiled TVM library (``model.so``, no ONNX graph)."""
        return (self.manifest.get("export") or {}).get("format", "onnx")

    @property
    def task(self) -> str:
        return self.manifest.get("task", "causal-lm")

    @property
    def size_bytes(self) -> int:
        return int(self.manifest.get("size_bytes", 0))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, local_files_only=True)
