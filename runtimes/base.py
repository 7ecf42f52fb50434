"""The interfaces runtimes implement, one per artifact task: :class:`Runtime` (causal LMs: logits and
generation) and :class:`EncoderRuntime` (sentence encoders: embeddings)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from edgecompress.artifact import Artifact


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


class Runtime(ABC):
    """Runs a causal-LM artifact: full-sequence logits (for checks) and greedy generation."""

    name: ClassVar[str]

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads

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


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
