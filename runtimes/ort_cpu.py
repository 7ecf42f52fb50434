"""ONNX Runtime on the CPU, with a lean decode loop.

The loop binds preallocated KV buffers as both ``past_key_values.*`` and ``present.*`` so
``GroupQueryAttention`` appends to them in place; the current token, the attention mask and
the logits live in NumPy arrays that ORT reads and writes directly (no copies per token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edgecompress.artifact import Artifact
from edgecompress.errors import ArtifactError

from .base import ClassifierRuntime, EncoderRuntime, Generation, Runtime, Timer, run_static, static_shape
from .static_lm import StaticLMRuntime

log = logging.getLogger(__name__)


def open_session(artifact: Artifact, threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on ``artifact`` with full graph optimisation."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # the optional `logits_to_keep` input is an overridable initializer
    # ORT rewrites int8 DequantizeLinear+MatMul into MatMulNBits; keep the artifact's numerics
    level = artifact.manifest.get("onnx", {}).get("accuracy_level", 4)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(artifact.onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types
        raise ArtifactError(f"ONNX Runtime cannot load {artifact.onnx_path}: {e}",
                            hint="re-export the artifact; check the onnxruntime version in its manifest") from None


class OrtCpuEncoder(EncoderRuntime):
    """A sentence-encoder artifact on ONNX Runtime CPU."""

    name = "ort-cpu"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        self.session = open_session(artifact, threads)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if static_shape(self.artifact) is not None:  # an NPU artifact: fixed [batch, sequence] inputs
            return run_static(lambda f: self.session.run(["sentence_embedding"], f)[0], self.artifact,
                              input_ids, attention_mask)
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        return self.session.run(["sentence_embedding"], feeds)[0]


class OrtCpuClassifier(ClassifierRuntime):
    """A static image-classifier artifact (the NPU's QDQ graph) on ONNX Runtime CPU."""

    name = "ort-cpu"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        self.session = open_session(artifact, threads)

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"pixel_values": pixel_values})[0]


class OrtCpuRuntime(Runtime):
    name = "ort-cpu"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        self.session = open_session(artifact, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        kv = [i for i in self.inputs if i.startswith("past_key_values.")]
        self.n_layers = len(kv) // 2
        shape = self.inputs["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.has_keep = "logits_to_keep" in {x.name for x in self.session.get_overridable_initializers()}

    def _empty_past(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(self.n_layers) for k in ("key", "value")}

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        past, done = self._empty_past(), np.zeros((0, self.vocab), np.float32)
        if self.prefix is not None and self.prefix.covers(ids):  # start from the shipped float prefix
            p = len(self.prefix.tokens)
            past = {f"past_key_values.{k}": v for k, v in self.prefix.kv.items()}
            done, ids = self.prefix.logits, ids[:, p:]
            if not ids.shape[1]:
                return done
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, len(done) + ids.shape[1]), np.int64), **past}
        return np.concatenate([done, self.session.run(["logits"], feeds)[0][0]])

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        p = len(prompt_ids)
        max_len = p + max_new_tokens
        # a shipped float prefix fills the first cache slots; the prompt's prefill starts after it
        pre = self.prefix if self.prefix is not None and self.prefix.covers(prompt_ids) else None
        skip = len(pre.tokens) if pre else 0
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")  # bound first: io.get_outputs()[0] is the logits
        kv = []
        for i in range(self.n_layers):
            for k in ("key", "value"):
                arr = np.zeros((1, self.kv_heads, max_len, self.head_dim), np.float32)
                if pre:
                    arr[:, :, :skip] = pre.kv[f"{i}.{k}"]
                buf = ort.OrtValue.ortvalue_from_numpy(arr)
                io.bind_ortvalue_input(f"past_key_values.{i}.{k}", buf)
                io.bind_ortvalue_output(f"present.{i}.{k}", buf)
                kv.append((arr, buf))  # keep alive
        # Every array ORT reads or writes is held here for the whole call: an OrtValue made
        # from NumPy borrows its memory.
        mask = np.ones(max_len, np.int64)
        keep = np.ones(1, np.int64)
        prompt = np.ascontiguousarray(np.asarray(prompt_ids[skip:], np.int64).reshape(1, p - skip))
        bound = [ort.OrtValue.ortvalue_from_numpy(prompt), ort.OrtValue.ortvalue_from_numpy(mask[:p].reshape(1, p))]
        if self.has_keep:
            bound.append(ort.OrtValue.ortvalue_from_numpy(keep))
            io.bind_ortvalue_input("logits_to_keep", bound[-1])
        io.bind_ortvalue_input("input_ids", bound[0])
        io.bind_ortvalue_input("attention_mask", bound[1])
        with Timer() as prefill:
            if skip == p:  # the prompt is the prefix: its last logits are shipped
                tok = int(pre.logits[-1].argmax())
            else:
                self.session.run_with_iobinding(io)
                tok = int(io.get_outputs()[0].numpy()[0, -1].argmax())
        tokens = [tok]
        if on_token:
            on_token(tok)
        cur = np.zeros((1, 1), np.int64)
        logits = np.empty((1, 1, self.vocab), np.float32)
        cur_v, logits_v = ort.OrtValue.ortvalue_from_numpy(cur), ort.OrtValue.ortvalue_from_numpy(logits)
        io.bind_ortvalue_input("input_ids", cur_v)
        io.bind_ortvalue_output("logits", logits_v)
        with Timer() as decode:
            for t in range(p, max_len - 1):
                if eos_token_id is not None and tok == eos_token_id:
                    break
                cur[0, 0] = tok
                mask_v = ort.OrtValue.ortvalue_from_numpy(mask[: t + 1].reshape(1, t + 1))
                io.bind_ortvalue_input("attention_mask", mask_v)
                self.session.run_with_iobinding(io)
                tok = int(logits[0, 0].argmax())
                tokens.append(tok)
                if on_token:
                    on_token(tok)
        return Generation(tokens, p, prefill.seconds, decode.seconds)


class OrtCpuStaticLM(StaticLMRuntime):
    """A static causal-LM NPU artifact's QDQ prefill/decode graphs on ONNX Runtime CPU (the comparison with the HTP)."""

    name = "ort-cpu"

    def _open(self, folder, graph):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        return ort.InferenceSession(str(folder / graph["model"]), so, providers=["CPUExecutionProvider"])
