"""The prefill/decode loop over a static causal-LM NPU artifact (``export/npu_llm.py``), shared by the
runtimes that run its two graphs (``qnn-htp``: the HTP; ``ort-cpu``: the same QDQ graphs on the CPU EP).

The runtime owns the fixed-size KV cache ``[layers, 2, kv_heads, max_context, head_dim]``: prefill writes
slots ``0..P-1``, each decode step feeds the whole cache with a mask over the filled slots and writes the
step's new row into slot ``position``. A prompt longer than ``prefill_len`` runs its first ``prefill_len``
tokens through prefill and the rest through decode, one at a time.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecompress.artifact import Artifact
from edgecompress.errors import ArtifactError, EdgeCompressError

from .base import Generation, Runtime, Timer


def static_lm_graphs(artifact: Artifact) -> dict:
    """The manifest's ``npu.graphs`` of a static causal-LM artifact (an error naming the fix otherwise)."""
    graphs = (artifact.manifest.get("npu") or {}).get("graphs")
    if not graphs or set(graphs) != {"prefill", "decode"}:
        raise ArtifactError(f"{artifact.path} is not a static causal-LM NPU artifact (no prefill/decode graphs)",
                            hint="export it with `target: npu-qnn` and static_shapes {prefill_len, max_context}")
    return graphs


def is_static_lm(artifact: Artifact) -> bool:
    return artifact.task == "causal-lm" and bool((artifact.manifest.get("npu") or {}).get("graphs"))


class StaticLMRuntime(Runtime):
    """Greedy generation and logits through a static prefill graph and a static decode graph."""

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        graphs = static_lm_graphs(artifact)
        shapes = artifact.manifest["npu"]["static_shapes"]
        self.prefill_len, self.max_context = int(shapes["prefill_len"]), int(shapes["max_context"])
        self.prefill_session = self._open(artifact.path, graphs["prefill"])
        self.decode_session = self._open(artifact.path, graphs["decode"])
        dec_in = {i.name: i.shape for i in self.decode_session.get_inputs()}
        self.layers = sum(1 for n in dec_in if n.startswith("past_key."))
        _, self.kv_heads, _, self.head_dim = (int(x) for x in dec_in["past_key.0"])

    @abstractmethod
    def _open(self, folder: Path, graph: dict):
        """An ONNX Runtime session on one of the artifact's graphs (``graph``: its manifest entry)."""

    # ------------------------------------------------------------------ graphs
    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[n, V]`` and per-layer (key, value) rows ``[kv, n, d]`` for ``n <= P`` tokens."""
        n, p = len(ids), self.prefill_len
        feeds = {"input_ids": np.pad(ids, (0, p - n))[None].astype(np.int64),
                 "position_ids": np.arange(p, dtype=np.int64)[None],
                 "attention_mask": (np.arange(p) < n).astype(np.int64)[None]}
        out = self.prefill_session.run(None, feeds)
        return out[0][0, :n], [x[0, :, :n] for x in out[1:]]

    def _decode(self, cache: np.ndarray, tok: int, pos: int) -> np.ndarray:
        """Logits ``[V]`` of token ``tok`` at ``pos``; writes its key/value rows into ``cache[..., pos, :]``."""
        feeds = {"input_ids": np.array([[tok]], np.int64), "position_ids": np.array([[pos]], np.int64),
                 "attention_mask": (np.arange(self.max_context) < pos).astype(np.int64)[None]}
        for i in range(self.layers):
            feeds[f"past_key.{i}"] = cache[i, 0][None]
            feeds[f"past_value.{i}"] = cache[i, 1][None]
        out = self.decode_session.run(None, feeds)
        for j, x in enumerate(out[1:]):
            cache[j // 2, j % 2, :, pos] = x[0, :, 0]
        return out[0][0, 0]

    def _new_cache(self) -> np.ndarray:
        return np.zeros((self.layers, 2, self.kv_heads, self.max_context, self.head_dim), np.float32)

    def _fill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run ``ids`` from an empty cache: (logits ``[len, V]``, the cache)."""
        if len(ids) > self.max_context:
            raise EdgeCompressError(f"{len(ids)} tokens do not fit the artifact's max_context {self.max_context}",
                                    hint=f"use at most {self.max_context} tokens (check: seq_len), or re-export "
                                    "with a larger static_shapes.max_context")
        cache = self._new_cache()
        head = ids[: self.prefill_len]
        logits, rows = self._prefill(head)
        for j, x in enumerate(rows):
            cache[j // 2, j % 2, :, : len(head)] = x
        more = [self._decode(cache, int(t), pos) for pos, t in enumerate(ids[len(head):], start=len(head))]
        return (np.concatenate([logits, np.stack(more)]) if more else logits), cache

    def forced_decode(self, prompt_ids: list[int], tokens: list[int],
                      on_step: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Logits ``[1 + len(tokens), V]``: after the prompt (prefill), then after each of ``tokens`` fed to the
        **decode graph** one at a time (teacher forcing). ``on_step(i, logits)``: called after each of them."""
        ids = np.asarray(prompt_ids, np.int64).reshape(-1)
        if len(ids) > self.prefill_len:
            raise EdgeCompressError(f"a {len(ids)}-token prompt is longer than prefill_len {self.prefill_len}")
        if len(ids) + len(tokens) > self.max_context:
            raise EdgeCompressError(f"{len(ids)} + {len(tokens)} tokens do not fit max_context {self.max_context}")
        logits, cache = self._fill(ids)
        out = [logits[-1]]
        for i, t in enumerate(tokens):
            out.append(self._decode(cache, int(t), len(ids) + i))
            if on_step is not None:
                on_step(i, out[-1])
        return np.stack(out).astype(np.float32)

    # ------------------------------------------------------------------ Runtime
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self._fill(np.asarray(input_ids, np.int64).reshape(-1))[0].astype(np.float32)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        ids = np.asarray(prompt_ids, np.int64).reshape(-1)
        p = len(ids)
        if p + max_new_tokens - 1 > self.max_context:
            raise EdgeCompressError(f"{p} prompt + {max_new_tokens} new tokens do not fit the artifact's max_context "
                                    f"{self.max_context}", hint="shorten the prompt or generate fewer tokens")
        with Timer() as prefill:
            logits, cache = self._fill(ids)
            tok = int(logits[-1].argmax())
        tokens = [tok]
        if on_token:
            on_token(tok)
        with Timer() as decode:
            for pos in range(p, p + max_new_tokens - 1):
                if eos_token_id is not None and tok == eos_token_id:
                    break
                tok = int(self._decode(cache, tok, pos).argmax())
                tokens.append(tok)
                if on_token:
                    on_token(tok)
        return Generation(tokens, p, prefill.seconds, decode.seconds)
