"""Which blocks or sublayers to remove, from calibration windows: block influence (ShortGPT) and a
FinerCut-style greedy search on the output divergence from the unpruned model.

* **Block influence** (Men et al. 2024, "ShortGPT"): ``BI = 1 - E_t[cos(x_in_t, x_out_t)]`` of a unit's input and
  output hidden states over the calibration tokens; scored once, the lowest-scoring units are removed.
* **Greedy** (Zhang et al. 2024, "FinerCut"): remove, one at a time, the unit whose removal gives the smallest
  divergence (KL or JS) of the next-token distributions from the unpruned model's, re-scoring every remaining
  unit after each removal.

A *unit* is a tuple of sublayer indices (see :mod:`.layers`): ``(s,)`` for one sublayer, ``(2i, 2i + 1)`` for
block ``i``. :class:`SublayerChain` runs the decoder as its chain of residual sublayers
``h_{s+1} = h_s + f_s(norm_s(h_s))`` and keeps every ``h_s`` of the current model, so trying a unit re-runs only
the sublayers from that unit on (on average half the decoder).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from edgecompress.progress import track

from .layers import decoder_layers, present_sublayers

log = logging.getLogger(__name__)

Unit = tuple[int, ...]


def kl_divergence(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, from log-probabilities ``[..., V]``."""
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


def js_divergence(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per position (natural log; at most log 2)."""
    m = torch.logaddexp(ref_lp, lp) - math.log(2.0)
    return 0.5 * (ref_lp.exp() * (ref_lp - m)).sum(-1) + 0.5 * (lp.exp() * (lp - m)).sum(-1)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_divergence, "js": js_divergence}


class SublayerChain:
    """The decoder of a Llama-family model on fixed token windows ``ids [B, T]``, one residual sublayer at a time.

    ``states(skip)`` gives every ``h_s`` (``2L + 1`` of them: the embedding output, then the residual stream after
    each sublayer) with the sublayers in ``skip`` removed; ``run(h, start, skip)`` continues from ``h_start``;
    ``log_probs(h)`` applies the final norm and the LM head. Runs in place on the model's modules (no copy).
    Divergences are measured at every ``stride``-th position of each window (the decoder runs on every token;
    the LM head and the divergence, a third of the cost on a 49k vocabulary, only where measured).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, *, stride: int = 1):
        from transformers.masking_utils import create_causal_mask

        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride
        self.model, self.layers = model, decoder_layers(model)
        self.present = set(present_sublayers(model))
        self.n = 2 * len(self.layers)
        inner = model.model
        with torch.no_grad():
            self.h0 = inner.embed_tokens(ids)
            t = ids.shape[1]
            self.position_ids = torch.arange(t)[None]
            self.position_embeddings = inner.rotary_emb(self.h0, self.position_ids)
            self.mask = create_causal_mask(config=model.config, input_embeds=self.h0, attention_mask=None,
                                           cache_position=torch.arange(t), past_key_values=None,
                                           position_ids=self.position_ids)

    def branch(self, s: int, h: torch.Tensor) -> torch.Tensor:
        """The residual branch ``f_s(norm_s(h))`` of sublayer ``s``."""
        layer = self.layers[s // 2]
        if s % 2 == 0:
            return layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=self.mask,
                                   position_embeddings=self.position_embeddings, position_ids=self.position_ids)[0]
        return layer.mlp(layer.post_attention_layernorm(h))

    @torch.no_grad()
    def run(self, h: torch.Tensor, start: int, skip: set[int]) -> torch.Tensor:
        for s in range(start, self.n):
            if s in self.present and s not in skip:
                h = h + self.branch(s, h)
        return h

    @torch.no_grad()
    def states(self, skip: set[int], *, reuse: list[torch.Tensor] | None = None, start: int = 0) -> list[torch.Tensor]:
        """``[h_0, ..., h_2L]`` with ``skip`` removed; ``reuse[:start + 1]`` (from an earlier call whose ``skip``
        agreed before ``start``) is kept as is."""
        hs = list(reuse[:start + 1]) if reuse is not None else [self.h0]
        for s in range(len(hs) - 1, self.n):
            h = hs[-1]
            hs.append(h + self.branch(s, h) if s in self.present and s not in skip else h)
        return hs

    @torch.no_grad()
    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (float32) of hidden states ``h [..., hidden]``."""
        return torch.log_softmax(self.model.lm_head(self.model.model.norm(h)).float(), dim=-1)

    @torch.no_grad()
    def divergence(self, ref: list[torch.Tensor], h: torch.Tensor, fn: Callable) -> float:
        """Mean divergence over the measured positions of ``h [B, T, hidden]`` from the reference log-probs (one
        per window; computed window by window, so only one ``[T, vocab]`` block of logits is alive at a time)."""
        total = sum(fn(r, self.log_probs(x[::self.stride])).sum() for r, x in zip(ref, h))
        return float(total) / sum(len(r) for r in ref)

    @torch.no_grad()
    def reference(self) -> list[torch.Tensor]:
        """Log-probabilities of the current (unpruned) model at the measured positions, one tensor per window."""
        final = self.states(set())[-1]
        return [self.log_probs(x[::self.stride]) for x in final]


def block_influence(chain: SublayerChain, units: Sequence[Unit]) -> dict[Unit, float]:
    """ShortGPT block influence ``1 - mean_t cos(h_in, h_out)`` of each unit, on the current model."""
    hs = chain.states(set())
    out = {}
    for u in units:
        a, b = hs[min(u)], hs[max(u) + 1]
        out[u] = float(1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    return out


def greedy_removal(chain: SublayerChain, units: Sequence[Unit], count: int, *, divergence: str = "kl",
                   rescore: int | None = None, allowed: Callable[[set[int]], bool] = lambda removed: True,
                   progress: bool = False) -> list[tuple[Unit, float]]:
    """FinerCut's greedy search: ``count`` units, each the one whose removal (with the earlier ones) gives the
    smallest mean divergence from the unpruned model on the chain's windows. Returns ``[(unit, divergence)]`` in
    removal order (the divergence of the model with that unit and all before it removed).

    ``rescore``: after the first round (every unit scored), re-score only the ``rescore`` units with the smallest
    divergence at their last scoring (None: all of them, as FinerCut does). ``allowed(removed)`` vetoes a
    removal set (e.g. one without attention)."""
    fn = DIVERGENCES[divergence]
    ref = chain.reference()
    removed: set[int] = set()
    hs = chain.states(removed)
    last: dict[Unit, float] = {}
    order: list[tuple[Unit, float]] = []
    for step in track(range(count), count, f"greedy {divergence} removal", progress):
        pool = [u for u in units if not removed & set(u) and allowed(removed | set(u))]
        if not pool:
            break
        if rescore is not None and last:
            pool = sorted(pool, key=lambda u: last.get(u, math.inf))[:rescore]
        for u in pool:
            start = min(u)
            last[u] = chain.divergence(ref, chain.run(hs[start], start, removed | set(u)), fn)
        best = min(pool, key=lambda u: last[u])
        order.append((best, last[best]))
        log.info("greedy step %d: removed sublayers %s, %s %.5f (%d scored)", step, best, divergence, last[best],
                 len(pool))
        removed |= set(best)
        hs = chain.states(removed, reuse=hs, start=min(best))
    return order
