"""Low-rank distillation: heal a compressed model toward the uncompressed one, merged into the weights.

After a step that changes what the model computes without changing its weights' shapes (activation
thresholds, layer or channel pruning), every selected float decoder linear gets a trainable rank-r
delta ``B A`` (``B`` zero at the start, so training starts from the compressed model). The deltas
are trained end to end on calibration windows to minimise KL(reference || model) of the next-token
distributions, the reference being the uncompressed model the pipeline keeps, then merged:
``W <- W + B A``. The model keeps its shapes, formats and thresholds; the export and every runtime
run it unchanged, at no extra cost (unlike the ``lowrank`` step's two extra MatMuls per layer).

It trains float weights, so it goes before quantization or weight sparsity: a packed or masked
weight would lose its format when a dense delta is added (the step refuses those layers).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.compress.quant.rtn import check_targets, select
from edgecompress.compress.quant.sequential import decoder_blocks
from edgecompress.errors import RecipeError
from edgecompress.progress import ticker

from .apply import check_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    rank: int = 16
    steps: int = 200  # optimiser steps, one calibration window each (cycling)
    lr: float = 1e-3  # Adam, cosine decay to 0
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    seed: int = 0  # initialisation of the A factors

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def distill_targets(model: nn.Module, cfg: DistillConfig) -> dict[str, nn.Linear]:
    """The float ``nn.Linear`` layers inside the decoder blocks that ``cfg`` selects (an activation-sparse
    linear contributes its inner ``nn.Linear``, which sees the thresholded input)."""
    try:
        blocks = decoder_blocks(model)
    except NotImplementedError:
        raise RecipeError(f"distill needs a Llama-family causal LM (model.layers), got {type(model).__name__}",
                          hint="drop the distill step for this model") from None
    check_targets(model, cfg.targets)
    inside = {id(m) for b in blocks for m in b.modules()}
    chosen, packed = {}, []
    for name, mod in model.named_modules():
        if id(mod) not in inside or not select(name, cfg.targets, cfg.ignore) or not hasattr(mod, "in_features"):
            continue
        if type(mod) is nn.Linear:
            chosen[name] = mod
        elif not isinstance(getattr(mod, "inner", None), nn.Linear) and not any(
                isinstance(c, nn.Linear) for c in mod.children()):
            packed.append(f"{name} ({type(mod).__name__})")
    if packed:
        raise RecipeError(f"distill trains float weights, and {', '.join(packed[:3])}"
                          + (f" and {len(packed) - 3} more" if len(packed) > 3 else "")
                          + " are already quantized or weight-sparse",
                          hint="put distill before the quantize/sparsify/lowrank steps, or ignore those layers")
    if not chosen:
        raise RecipeError("distill selects no float linear layer inside the decoder blocks",
                          hint="check targets/ignore")
    check_rank("distill", chosen, cfg.rank)
    return chosen


class Deltas(nn.Module):
    """Trainable rank-r deltas on a set of linears, applied by forward hooks: ``y = x W^T (+ b) + (x A^T) B^T``."""

    def __init__(self, linears: dict[str, nn.Linear], rank: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.linears = linears
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, lin in linears.items():
            self.A[self._key(name)] = nn.Parameter(torch.randn(rank, lin.in_features, generator=gen)
                                                   / math.sqrt(lin.in_features))
            self.B[self._key(name)] = nn.Parameter(torch.zeros(lin.out_features, rank))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "/")  # ParameterDict keys cannot hold dots

    def delta(self, name: str) -> torch.Tensor:
        return (self.B[self._key(name)] @ self.A[self._key(name)]).detach()

    @contextmanager
    def applied(self) -> Iterator[None]:
        handles = []
        for name, lin in self.linears.items():
            A, B = self.A[self._key(name)], self.B[self._key(name)]

            def hook(_mod, inputs, out, A=A, B=B):
                return out + F.linear(F.linear(inputs[0], A.to(out.dtype)), B.to(out.dtype))
            handles.append(lin.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + B A`` in every linear (the hooks must be gone)."""
        for name, lin in self.linears.items():
            lin.weight += self.delta(name).to(lin.weight.dtype)


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(reference || model), both ``[tokens, vocab]``."""
    return F.kl_div(F.log_softmax(logits.float(), -1), ref_logp, log_target=True, reduction="batchmean")


def apply_distill(model: nn.Module, reference: nn.Module, windows: torch.Tensor, cfg: DistillConfig, *,
                  progress: bool = False) -> list[dict[str, Any]]:
    """Train rank-``cfg.rank`` deltas of the selected linears on ``windows`` ``[n, seq_len]`` to match
    ``reference``'s next-token distributions, then merge them into the weights (in place)."""
    chosen = distill_targets(model, cfg)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"distill needs token windows [n, seq_len], got shape {tuple(windows.shape)}")
    deltas = Deltas(chosen, cfg.rank, cfg.seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(deltas.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    was_training = model.training
    model.eval()  # no dropout; the deltas train anyway
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with deltas.applied(), ticker(cfg.steps, f"distill r{cfg.rank}", progress) as advance:
            for step in range(cfg.steps):
                ids = windows[step % len(windows)][None]
                with torch.no_grad():
                    ref_logp = F.log_softmax(reference(input_ids=ids, use_cache=False).logits[0].float(), -1)
                loss = kl_to_reference(model(input_ids=ids, use_cache=False).logits[0], ref_logp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                advance()
        records = [{"module": name.removesuffix(".inner"), "format": "distilled", "rank": cfg.rank,
                    "delta_rel_norm": float(deltas.delta(name).norm() / lin.weight.norm().clamp_min(1e-12))}
                   for name, lin in chosen.items()]
        deltas.merge()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    tenth = max(1, cfg.steps // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    seconds = time.perf_counter() - t0
    log.info("distill r%d: %d linears, %d steps on %d windows, KL %.4f (first tenth) -> %.4f (last tenth), %.0f s",
             cfg.rank, len(chosen), cfg.steps, len(windows), first, last, seconds)
    summary = {"distill": {"rank": cfg.rank, "steps": cfg.steps, "lr": cfg.lr, "windows": len(windows),
                           "tokens_per_window": int(windows.shape[1]), "layers": len(chosen),
                           "kl_first_tenth": first, "kl_last_tenth": last, "seconds": round(seconds, 1)}}
    return [summary] + records
