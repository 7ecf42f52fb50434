"""The statistics store: every calibration statistic, keyed by (module name, stat name).

On disk a store is a folder with ``stats.safetensors`` (keys
``"{module}::{stat}::{tensor}"``, float32) and ``meta.json`` (format version, model
and data fingerprints, per-entry counts, creation time, the requests). ``meta.json``
is written last and records the sha256 of ``stats.safetensors``, so a store is
either complete or absent; a damaged file is reported, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgecompress.compress.calibration.observers import Observer, observer_class
from edgecompress.artifact import sha256_file
from edgecompress.errors import EdgeCompressError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"
_SEP = "::"
_DELETE_HINT = "delete the statistics folder to recalibrate"

Key = tuple[str, str]


class StatsStore:
    """In-memory ``{(module, stat): {tensor_name: float32 tensor}}`` plus token counts."""

    def __init__(self, model_fingerprint: str | None = None, data_fingerprint: str | None = None) -> None:
        self.model_fingerprint = model_fingerprint
        self.data_fingerprint = data_fingerprint
        self.entries: dict[Key, dict[str, torch.Tensor]] = {}
        self.counts: dict[Key, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.created: str | None = None

    # ------------------------------------------------------------------ access
    def put(self, module: str, stat: str, tensors: dict[str, torch.Tensor], count: int) -> None:
        """Set one entry (replacing any previous one); tensors are stored as float32 on the CPU."""
        if _SEP in module or _SEP in stat:
            raise ValueError(f"module and stat names may not contain {_SEP!r}: {module!r}, {stat!r}")
        self.entries[(module, stat)] = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        self.counts[(module, stat)] = int(count)

    def add_observer(self, module: str, stat: str, obs: Observer) -> None:
        """Store an observer's state, merging with an existing entry (more data, same statistic)."""
        if obs.count == 0:
            log.warning("no activations reached %s for %r; nothing stored", module, stat)
            return
        if self.has(module, stat):
            obs = self.observer(module, stat).merge(obs)
        self.put(module, stat, obs.state(), obs.count)

    def get(self, module: str, stat: str) -> dict[str, torch.Tensor]:
        """The tensors of one entry; KeyError naming what is missing."""
        try:
            return self.entries[(module, stat)]
        except KeyError:
            raise KeyError(f"no statistic {stat!r} for module {module!r} in the store") from None

    def has(self, module: str, stat: str) -> bool:
        """Whether the entry exists."""
        return (module, stat) in self.entries

    def count(self, module: str, stat: str) -> int:
        """Tokens that went into one entry."""
        self.get(module, stat)
        return self.counts[(module, stat)]

    def observer(self, module: str, stat: str) -> Observer:
        """Rebuild the observer of one entry (e.g. to ask a histogram for a quantile)."""
        return observer_class(stat).from_state(self.get(module, stat), self.counts[(module, stat)])

    def modules(self, stat: str) -> list[str]:
        """Module names that have ``stat``, in insertion order."""
        return [m for (m, s) in self.entries if s == stat]

    def keys(self) -> list[Key]:
        """All (module, stat) keys, in insertion order."""
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``stats.safetensors`` then ``meta.json`` atomically (temp file + rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {f"{m}{_SEP}{s}{_SEP}{t}": v for (m, s), d in self.entries.items() for t, v in d.items()}
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        stats_tmp = folder / f".{STATS_FILE}.tmp"
        meta_tmp = folder / f".{META_FILE}.tmp"
        save_file(flat, str(stats_tmp))
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "created": self.created,
            "stats_sha256": sha256_file(stats_tmp),
            "entries": [
                {"module": m, "stat": s, "count": self.counts[(m, s)], "tensors": sorted(d)}
                for (m, s), d in self.entries.items()
            ],
            "requests": self.requests,
        }
        meta_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (folder / META_FILE).unlink(missing_ok=True)  # no meta = no store while files change
        os.replace(stats_tmp, folder / STATS_FILE)
        os.replace(meta_tmp, folder / META_FILE)
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        model_fingerprint: str | None = None,
        data_fingerprint: str | None = None,
    ) -> StatsStore | None:
        """Load a saved store, or None when files are missing or a given fingerprint differs.

        Raises EdgeCompressError naming the file when a file exists but is damaged.
        """
        folder = Path(folder)
        meta_path, stats_path = folder / META_FILE, folder / STATS_FILE
        if not meta_path.is_file() or not stats_path.is_file():
            log.info("no complete statistics store in %s", folder)
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            version = meta["format_version"]
            entries = meta["entries"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EdgeCompressError(f"statistics metadata {meta_path} is corrupt: {exc}", hint=_DELETE_HINT) from exc
        if version != FORMAT_VERSION:
            log.info("statistics store %s has format %s, expected %s; ignoring it", folder, version, FORMAT_VERSION)
            return None
        for what, want, have in (
            ("model", model_fingerprint, meta.get("model_fingerprint")),
            ("data", data_fingerprint, meta.get("data_fingerprint")),
        ):
            if want is not None and want != have:
                log.info("statistics store %s was made for another %s (%s, not %s)", folder, what, have, want)
                return None
        if meta.get("stats_sha256") != sha256_file(stats_path):
            raise EdgeCompressError(
                f"statistics file {stats_path} is corrupt (checksum does not match {META_FILE})", hint=_DELETE_HINT
            )
        try:
            flat = load_file(str(stats_path))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise EdgeCompressError(f"statistics file {stats_path} is corrupt: {exc}", hint=_DELETE_HINT) from exc
        store = cls(meta.get("model_fingerprint"), meta.get("data_fingerprint"))
        store.created = meta.get("created")
        store.requests = list(meta.get("requests", []))
        try:
            for e in entries:
                tensors = {t: flat[f"{e['module']}{_SEP}{e['stat']}{_SEP}{t}"] for t in e["tensors"]}
                store.put(e["module"], e["stat"], tensors, e["count"])
        except (KeyError, TypeError) as exc:
            raise EdgeCompressError(
                f"statistics file {stats_path} does not match {META_FILE} (missing {exc})", hint=_DELETE_HINT
            ) from exc
        return store


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: name, shape, dtype and bytes.

    Reads each tensor once (about half a second for 135M float32 parameters on one
    CPU core). Tied weights are hashed once. Tensors on the ``meta`` device contribute
    only name, shape and dtype.
    """
    h = hashlib.sha256()
    named = [("param", n, p) for n, p in model.named_parameters()]
    named += [("buffer", n, b) for n, b in model.named_buffers()]
    for kind, name, t in named:
        h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        if t.device.type != "meta" and t.numel():
            flat = t.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()
