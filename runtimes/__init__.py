"""Runtimes behind one interface (:class:`~edgecompress.runtimes.base.Runtime`)."""

from __future__ import annotations

from edgecompress.artifact import Artifact
from edgecompress.errors import EdgeCompressError

from .base import Generation, Runtime

RUNTIMES = {
    "ort-cpu": "edgecompress.runtimes.ort_cpu:OrtCpuRuntime",
    "torch": "edgecompress.runtimes.torch_ref:TorchRuntime",
}


def open_runtime(name: str, artifact: Artifact, *, threads: int | None = None) -> Runtime:
    """Instantiate runtime ``name`` on ``artifact`` (imports only the backend asked for)."""
    import importlib

    if name not in RUNTIMES:
        raise EdgeCompressError(f"unknown runtime {name!r}", hint=f"choose one of: {', '.join(RUNTIMES)}")
    if artifact.task != "causal-lm":
        raise EdgeCompressError(f"runtime {name} runs causal-LM artifacts; this one is {artifact.task!r}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)(artifact, threads=threads)


__all__ = ["RUNTIMES", "Generation", "Runtime", "open_runtime"]
