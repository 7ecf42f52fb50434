"""Qualcomm HTP (NPU) through the ``onnxruntime-qnn`` plugin; on x86-64 Linux its HTP backend is a simulator.

Sessions register the plugin library, pick the QNN device from ``ort.get_ep_devices()``, use the HTP
backend and set ``session.disable_cpu_ep_fallback=1``: a graph that does not run entirely on the HTP
fails to load (ORT names the unsupported nodes) instead of silently running on the CPU.
:func:`placement` counts the nodes each execution provider ran (from ORT's profile), so "0 CPU nodes"
is measured, not assumed.

An NPU artifact carries its compiled QNN context (``model_ctx.onnx``, an ``EPContext`` node holding the
HTP graph) next to the QDQ ``model.onnx``: loading the context skips compilation. The manifest records
the onnxruntime-qnn version that built it; under another version the runtime compiles the QDQ model
again (and says so) rather than load a binary the backend may misread.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path

import numpy as np

from edgecompress.artifact import Artifact
from edgecompress.errors import ArtifactError, EdgeCompressError

from .base import ClassifierRuntime, EncoderRuntime, run_static, static_shape
from .static_lm import StaticLMRuntime

log = logging.getLogger(__name__)

CONTEXT_FILE = "model_ctx.onnx"
_INSTALL_HINT = "pip install onnxruntime-qnn==2.7.0 (or: pip install -e '.[npu]'); its x86-64 Linux wheel simulates the HTP"


def qnn_version() -> str | None:
    """The installed onnxruntime-qnn version, or None."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return onnxruntime_qnn.__version__


def _devices():
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        raise EdgeCompressError("the qnn-htp runtime needs the onnxruntime-qnn plugin, which is not installed",
                                hint=_INSTALL_HINT) from None
    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devs:
        raise EdgeCompressError("onnxruntime-qnn is installed but exposes no QNN device", hint=_INSTALL_HINT)
    return devs, onnxruntime_qnn.get_qnn_htp_path()


def htp_session(path: str | Path, *, threads: int | None = None, profile: bool = False,
                context_out: str | Path | None = None):
    """An ORT session on the QNN HTP backend with CPU fallback disabled.

    ``context_out``: also write the compiled QNN context there (an ``EPContext`` model, embedded)."""
    import onnxruntime as ort

    devs, backend = _devices()
    so = ort.SessionOptions()
    so.add_provider_for_devices(devs, {"backend_path": backend})
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgecompress_qnn_profile")
    if context_out is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_out))
        so.add_session_config_entry("ep.context_embed_mode", "1")
    try:
        return ort.InferenceSession(str(path), so)
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types
        raise ArtifactError(f"QNN HTP cannot run {path} with CPU fallback disabled: {e}",
                            hint="export the model with `target: npu-qnn` (static shapes, QDQ); ops it names "
                            "are not supported by the HTP") from None


def placement(session, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Run ``session`` (made with ``profile=True``) once; return {execution provider: nodes it ran}."""
    session.run(None, feeds)
    path = session.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)
    counts: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            counts[e.get("args", {}).get("provider", "?")] += 1
    return dict(counts)


def artifact_session(artifact: Artifact, threads: int | None = None):
    """``(session, "context" | "qdq")``: the artifact's compiled HTP context when this onnxruntime-qnn built
    it, else its QDQ model compiled now (with a warning when a context from another version is skipped)."""
    npu = artifact.manifest.get("npu") or {}
    if not npu.get("static_shapes"):
        raise ArtifactError(f"{artifact.path} is not an NPU artifact (no static shapes in its manifest)",
                            hint="export it with `target: npu-qnn` and static_shapes, or use runtime ort-cpu")
    ctx = artifact.path / npu["context"] if npu.get("context") else None
    return context_or_qdq(artifact.onnx_path, ctx, npu.get("onnxruntime_qnn"), threads)


def context_or_qdq(model: Path, ctx: Path | None, built_with: str | None, threads: int | None = None):
    """``(session, "context" | "qdq")`` on the compiled context ``ctx`` when this onnxruntime-qnn built it,
    else on the QDQ ``model`` (compiled now)."""
    here = qnn_version()
    if ctx is not None and ctx.exists() and built_with == here:
        return htp_session(ctx, threads=threads), "context"
    if ctx is not None and not ctx.exists():
        log.warning("the QNN context %s is missing: compiling the QDQ model instead", ctx)
    elif ctx is not None:
        log.warning("the QNN context %s was built by onnxruntime-qnn %s, this is %s: compiling the QDQ "
                    "model instead", ctx, built_with, here)
    return htp_session(model, threads=threads), "qdq"


class QnnHtpEncoder(EncoderRuntime):
    """A static NPU sentence-encoder artifact on the QNN HTP backend (CPU fallback disabled)."""

    name = "qnn-htp"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        if static_shape(artifact) is None:
            raise ArtifactError(f"{artifact.path} is not an NPU artifact (no static shapes in its manifest)",
                                hint="export it with `target: npu-qnn` and static_shapes, or use runtime ort-cpu")
        self.session, self.compiled_from = artifact_session(artifact, threads)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return run_static(lambda f: self.session.run(["sentence_embedding"], f)[0], self.artifact,
                          input_ids, attention_mask)


class QnnHtpClassifier(ClassifierRuntime):
    """A static NPU image-classifier artifact on the QNN HTP backend (CPU fallback disabled)."""

    name = "qnn-htp"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.session, self.compiled_from = artifact_session(artifact, threads)
        super().__init__(artifact, threads=threads)

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"pixel_values": pixel_values})[0]


class QnnHtpLM(StaticLMRuntime):
    """A static causal-LM NPU artifact (prefill + decode graphs) on the QNN HTP backend, CPU fallback disabled:
    a graph with any node the HTP cannot run fails to load. ``placement``: the nodes per execution provider
    of each graph, measured at export (ORT's profile)."""

    name = "qnn-htp"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.compiled_from: dict[str, str] = {}
        super().__init__(artifact, threads=threads)
        graphs = artifact.manifest["npu"]["graphs"]
        self.placement = {g: graphs[g].get("placement") for g in ("prefill", "decode")}

    def _open(self, folder: Path, graph: dict):
        ctx = folder / graph["context"] if graph.get("context") else None
        session, how = context_or_qdq(folder / graph["model"], ctx, self.artifact.manifest["npu"].get("onnxruntime_qnn"),
                                      self.threads)
        self.compiled_from[graph["model"]] = how
        return session
