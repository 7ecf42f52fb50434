"""Runtimes behind one interface (:class:`~edgecompress.runtimes.base.Runtime`)."""

from __future__ import annotations

from edgecompress.artifact import Artifact
from edgecompress.errors import EdgeCompressError

from .base import ClassifierRuntime, EncoderRuntime, Generation, Runtime

# runtime name -> {artifact task: "module:class"}; "causal-lm/static": a causal LM's NPU form (prefill + decode graphs)
RUNTIMES = {
    "ort-cpu": {"causal-lm": "edgecompress.runtimes.ort_cpu:OrtCpuRuntime",
                "sentence-encoder": "edgecompress.runtimes.ort_cpu:OrtCpuEncoder",
                "image-classifier": "edgecompress.runtimes.ort_cpu:OrtCpuClassifier",
                "causal-lm/static": "edgecompress.runtimes.ort_cpu:OrtCpuStaticLM"},
    "qnn-htp": {"causal-lm/static": "edgecompress.runtimes.qnn_htp:QnnHtpLM",
                "sentence-encoder": "edgecompress.runtimes.qnn_htp:QnnHtpEncoder",
                "image-classifier": "edgecompress.runtimes.qnn_htp:QnnHtpClassifier"},
    "torch": {"causal-lm": "edgecompress.runtimes.torch_ref:TorchRuntime"},
    "tvm-cpu": {"causal-lm": "edgecompress.runtimes.tvm_cpu:TvmCpuRuntime"},
}
# runtimes that run a compiled artifact of a format other than ONNX
NATIVE = {"tvm": ("tvm-cpu",)}


def open_runtime(name: str, artifact: Artifact, *,
                 threads: int | None = None) -> Runtime | EncoderRuntime | ClassifierRuntime:
    """Instantiate runtime ``name`` on ``artifact`` (imports only the backend asked for)."""
    import importlib

    if name not in RUNTIMES:
        raise EdgeCompressError(f"unknown runtime {name!r}", hint=f"choose one of: {', '.join(RUNTIMES)}")
    from .static_lm import is_static_lm

    by_task = RUNTIMES[name]
    task = "causal-lm/static" if is_static_lm(artifact) else artifact.task
    if task not in by_task:
        able = [n for n, tasks in RUNTIMES.items() if task in tasks]
        raise EdgeCompressError(f"runtime {name} does not run {task} artifacts ({', '.join(by_task)} only)",
                                hint=f"use runtime {' or '.join(able)}" if able else "")
    if artifact.format != "onnx" and name not in NATIVE.get(artifact.format, ()):
        raise EdgeCompressError(f"{artifact.path} is a compiled {artifact.format} artifact; runtime {name} runs "
                                "ONNX artifacts", hint=f"use --runtime {' or '.join(NATIVE.get(artifact.format, ()))}"
                                " (or run the ONNX artifact it was compiled from)")
    module, cls = by_task[task].split(":")
    return getattr(importlib.import_module(module), cls)(artifact, threads=threads)


__all__ = ["RUNTIMES", "ClassifierRuntime", "EncoderRuntime", "Generation", "Runtime", "open_runtime"]
