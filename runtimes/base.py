"""The interfaces runtimes implement, one per artifact task: :class:`Runtime` (causal LMs: logits and
generation), :class:`EncoderRuntime` (sentence encoders: embeddings) and :class:`ClassifierRuntime` (image
classifiers: logits of a batch of images)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgecompress.artifact import Artifact
from edgecompress.errors import EdgeCompressError

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Greedy generation result with its timing split into prefill and decode."""

    tokens: list[int]  # generated tokens (prompt excluded)
    prompt_tokens: int
    prefill_seconds: float  # prompt forward, producing the first new token
    decode_seconds: float  # every later token

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tok_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else float("nan")


@dataclass
class Prefix:
    """An artifact's float prefix (PrefixQuant, see ``compress/quant/prefix.py``): the KV cache and
    logits of its first tokens, computed once in float at export; sequences starting with
    ``tokens`` start from this cache instead of running them through the quantized graph."""

    tokens: list[int]
    kv: dict[str, np.ndarray]  # "{i}.key" / "{i}.value": [1, kv_heads, P, head_dim] float32
    logits: np.ndarray  # [P, vocab] float32

    @classmethod
    def load(cls, artifact: Artifact) -> Prefix | None:
        meta = artifact.manifest.get("prefix")
        if not meta:
            return None
        from safetensors.numpy import load_file

        state = load_file(str(artifact.path / meta["file"]))
        return cls(list(meta["tokens"]), {k: v for k, v in state.items() if k != "logits"}, state["logits"])

    def covers(self, ids: np.ndarray | list[int]) -> bool:
        """Whether the sequence ``ids`` starts with the prefix."""
        head = [int(t) for t in np.asarray(ids).reshape(-1)[: len(self.tokens)]]
        if head == self.tokens:
            return True
        log.warning("the input does not start with the artifact's float prefix %s: its first token runs "
                    "through the quantized graph, outside the calibrated activation ranges", self.tokens)
        return False


class Runtime(ABC):
    """Runs a causal-LM artifact: full-sequence logits (for checks) and greedy generation."""

    name: ClassVar[str]

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads
        self.prefix = Prefix.load(artifact)

    @abstractmethod
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits ``[S, vocab]`` (float32) for one sequence of token ids ``[S]``, from an empty cache."""

    @abstractmethod
    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Greedy decoding; stops at ``eos_token_id`` unless it is None."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class EncoderRuntime(ABC):
    """Runs a sentence-encoder artifact: pooled, normalised embeddings for a padded batch."""

    name: ClassVar[str]

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads

    @abstractmethod
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Sentence embeddings ``[B, H]`` (float32) for token ids and mask ``[B, S]``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class ClassifierRuntime(ABC):
    """Runs a static image-classifier artifact (``pixel_values [b, 3, S, S]`` -> ``logits``)."""

    name: ClassVar[str]

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads
        shapes = (artifact.manifest.get("npu") or {}).get("static_shapes") or {}
        if "image_size" not in shapes:
            raise EdgeCompressError(f"{artifact.path} has no static image size in its manifest",
                                    hint="export image classifiers with target npu-qnn and static_shapes.image_size")
        self.batch_size, self.image_size = int(shapes["batch_size"]), int(shapes["image_size"])

    @abstractmethod
    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        """Logits for exactly ``batch_size`` images."""

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Logits ``[N, classes]`` (float32) for normalised images ``[N, 3, S, S]``, in chunks of the static
        batch (the last one padded with copies of its last image, whose outputs are dropped)."""
        x = np.asarray(images, np.float32)
        if x.shape[1:] != (3, self.image_size, self.image_size):
            raise EdgeCompressError(f"images of shape {tuple(x.shape[1:])} do not fit the artifact's static "
                                    f"[3, {self.image_size}, {self.image_size}]")
        b, outs = self.batch_size, []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
            outs.append(self._run(np.ascontiguousarray(chunk))[:n])
        return np.concatenate(outs)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def static_shape(artifact: Artifact) -> tuple[int, int] | None:
    """(batch, sequence length) of a static NPU encoder artifact, or None for a dynamic one."""
    npu = artifact.manifest.get("npu")
    if not npu:
        return None
    shapes = npu["static_shapes"]
    return int(shapes["batch_size"]), int(shapes["sequence_length"])


def run_static(run_fn, artifact: Artifact, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Feed ``[B, L]`` inputs to a static ``[b, S]`` encoder: rows in chunks of b, padded to S (a
    sentence longer than S is an error: it would be silently truncated)."""
    b, s = static_shape(artifact)
    ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    if ids.shape[1] > s:
        if mask[:, s:].any():
            raise EdgeCompressError(f"inputs of {ids.shape[1]} tokens do not fit the NPU artifact's static "
                                    f"sequence length {s}", hint=f"truncate to {s} tokens (check: seq_len: {s})")
        ids, mask = ids[:, :s], mask[:, :s]
    pad = s - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)))
    mask = np.pad(mask, ((0, 0), (0, pad)))
    outs = []
    for i in range(0, len(ids), b):
        chunk_ids, chunk_mask = ids[i:i + b], mask[i:i + b]
        n = len(chunk_ids)
        if n < b:  # pad the batch with copies of the last row; their outputs are dropped
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], b - n, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], b - n, 0)])
        outs.append(run_fn({"input_ids": chunk_ids, "attention_mask": chunk_mask})[:n])
    return np.concatenate(outs)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
