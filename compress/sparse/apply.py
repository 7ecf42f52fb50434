"""The sparsify transform: select decoder linears by regex, prune them, swap in ``SparseLinear``.

Thin adapter over the pure cores (:mod:`.masks`, :mod:`.sparsegpt`). Wanda and SparseGPT run
block by block through the one sequential calibration driver (as GPTQ does), so later blocks are
calibrated on the outputs of the already-pruned earlier ones; layers reading the same input
(q/k/v, gate/up) share one observed statistic. Magnitude needs no data.

Only ``nn.Linear`` layers inside the decoder blocks are pruned (the embedding and the tied LM head
are left alone). A layer that an earlier step already quantized is skipped: run ``sparsify``
before ``quantize`` (a later RTN or GPTQ keeps the pruned weights exactly zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, calibrate, sequential_calibrate
from edgecompress.compress.calibration.store import StatsStore
from edgecompress.compress.quant.rtn import _set_module, check_targets, select
from edgecompress.compress.quant.sequential import (LINEAR_TYPES, OBSERVED, _block_prefix, _drop, decoder_blocks,
                                                    stat_source)
from edgecompress.errors import RecipeError

from .format import SparseLinear, SparseTensor
from .masks import magnitude_scores, outlier_ratio, owl_sparsities, parse_pattern, select_mask, wanda_scores
from .sparsegpt import sparsegpt_prune

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
STAT = {"wanda": "meansq", "sparsegpt": "hessian"}


@dataclass(frozen=True)
class SparsifyConfig:
    method: str = "wanda"
    sparsity: float = 0.5  # unstructured only; N:M implies 1 - N/M
    pattern: str = "unstructured"  # or "N:M" (N kept of every M inputs)
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    damp: float = 0.01  # sparsegpt: relative Hessian damping
    block: int = 128  # sparsegpt: lazy-update block (columns)
    value_dtype: str = "float16"  # kept values are rounded to this storage dtype
    allocation: str = "uniform"  # uniform | owl (per-block sparsity from Wanda-score outliers; unstructured)
    owl_lambda: float = 0.08  # owl: per-block sparsities lie within sparsity +- owl_lambda
    owl_m: float = 5.0  # owl: a score is an outlier above owl_m times its layer's mean

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        parse_pattern(self.pattern)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in ("uniform", "owl"):
            raise ValueError(f"allocation must be uniform or owl, got {self.allocation!r}")
        if self.allocation == "owl" and self.pattern != "unstructured":
            raise ValueError("owl allocation varies the sparsity per block: it needs pattern 'unstructured'")
        if self.value_dtype not in ("float16", "float32"):
            raise ValueError(f"value_dtype must be float16 or float32, got {self.value_dtype!r}")


def _targets(model: nn.Module, blocks: nn.ModuleList, cfg: SparsifyConfig) -> list[tuple[str, nn.Linear]]:
    """The selected plain ``nn.Linear`` layers inside the blocks; every bad shape reported at once."""
    check_targets(model, cfg.targets)
    inside = {id(m) for b in blocks for m in b.modules()}
    chosen, skipped = [], []
    for name, mod in model.named_modules():
        if id(mod) not in inside or not select(name, cfg.targets, cfg.ignore):
            continue
        if type(mod) is nn.Linear:
            chosen.append((name, mod))
        elif hasattr(mod, "packed") or isinstance(mod, SparseLinear):
            skipped.append(name)
    if skipped:
        log.warning("sparsify leaves %d already compressed layers alone (e.g. %s); put sparsify before quantize",
                    len(skipped), skipped[0])
    if not chosen:
        raise RecipeError("sparsify selects no fp32 linear layer inside the decoder blocks",
                          hint="check targets/ignore; a layer quantized by an earlier step cannot be pruned "
                               "(put sparsify before quantize)")
    nm = parse_pattern(cfg.pattern)
    if nm is not None:
        bad = [f"{n} (K={m.in_features})" for n, m in chosen if m.in_features % nm[1]]
        if bad:
            raise RecipeError(f"pattern {cfg.pattern} needs every pruned layer's input size to divide by {nm[1]}; "
                              f"not: {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
                              hint="add those layers to ignore, or use pattern: unstructured")
    return chosen


def _round(w: torch.Tensor, dtype: str) -> torch.Tensor:
    return w.to(torch.float16).to(torch.float32) if dtype == "float16" else w


def sparsify_weight(W: torch.Tensor, cfg: SparsifyConfig, stat: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune one weight: (pruned weight with zeros, keep-mask, diagnostics). ``stat``: meansq or Hessian."""
    if cfg.method == "sparsegpt":
        return sparsegpt_prune(W, stat, cfg.sparsity, cfg.pattern, damp=cfg.damp, block=cfg.block)
    scores = wanda_scores(W, stat) if cfg.method == "wanda" else magnitude_scores(W)
    keep = select_mask(scores, cfg.sparsity, cfg.pattern, per_row=cfg.method == "wanda")
    return W.detach().to(torch.float32) * keep, keep, {}


def _replace(model: nn.Module, name: str, mod: nn.Linear, cfg: SparsifyConfig, stat: torch.Tensor | None) -> dict:
    W, keep, diag = sparsify_weight(mod.weight.data, cfg, stat)
    sparse = SparseTensor.from_dense(_round(W, cfg.value_dtype), keep)
    _set_module(model, name, SparseLinear(sparse, mod.bias, pattern=cfg.pattern))
    rec = {"module": name, "format": "sparse", "method": cfg.method, "pattern": cfg.pattern,
           "target_sparsity": round(cfg.sparsity, 6) if cfg.pattern == "unstructured" else None,
           "sparsity": round(sparse.sparsity, 6), "nnz": sparse.nnz, "shape": list(sparse.shape),
           "value_dtype": cfg.value_dtype}
    return {**rec, "sparsegpt": diag} if diag else rec


def owl_allocation(model: nn.Module, batches: torch.Tensor, chosen: dict[str, nn.Module], cfg: SparsifyConfig, *,
                   progress: bool = False, batch_size: int = 1) -> dict[str, float]:
    """Per-block sparsities (keyed by block prefix) by OWL, from Wanda scores of the dense model."""
    store = calibrate(model, batches, [StatRequest(OBSERVED, "meansq", module_types=LINEAR_TYPES)],
                      progress=progress, batch_size=batch_size)
    prefixes = [_block_prefix(model, b) for b in decoder_blocks(model)]
    ratios = []
    for prefix in prefixes:
        scores = [wanda_scores(m.weight, store.get(stat_source(n), "meansq")["meansq"]).flatten()
                  for n, m in chosen.items() if n.startswith(prefix + ".")]
        ratios.append(outlier_ratio(torch.cat(scores), cfg.owl_m) if scores else 0.0)
    per_block = dict(zip(prefixes, owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)))
    log.info("OWL outlier ratios %s -> sparsities %s", [round(r, 4) for r in ratios],
             [round(s, 3) for s in per_block.values()])
    return per_block


def apply_sparsify(model: nn.Module, batches: torch.Tensor, cfg: SparsifyConfig, *, progress: bool = False,
                   batch_size: int = 1) -> list[dict[str, Any]]:
    """Prune the selected decoder linears in place; returns one manifest record per layer."""
    blocks = decoder_blocks(model)
    chosen = dict(_targets(model, blocks, cfg))
    records: list[dict[str, Any]] = []
    per_block: dict[str, float] = {}
    if cfg.allocation == "owl":
        per_block = owl_allocation(model, batches, chosen, cfg, progress=progress, batch_size=batch_size)

    def cfg_for(name: str) -> SparsifyConfig:
        block = next((p for p in per_block if name.startswith(p + ".")), None)
        return cfg if block is None else replace(cfg, sparsity=per_block[block])

    if cfg.method == "magnitude":
        for name, mod in chosen.items():
            records.append(_replace(model, name, mod, cfg_for(name), None))
    else:
        stat = STAT[cfg.method]

        def on_block(i: int, block: nn.Module, store: StatsStore) -> None:
            prefix = _block_prefix(model, block)
            for name, mod in list(block.named_modules()):
                full = f"{prefix}.{name}"
                if full in chosen:
                    s = store.get(stat_source(full), stat)[stat]
                    records.append(_replace(model, full, mod, cfg_for(full), s))
            _drop(store, prefix)

        sequential_calibrate(model, batches, blocks, [StatRequest(OBSERVED, stat, module_types=LINEAR_TYPES)], on_block, progress=progress,
                             batch_size=batch_size)
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    kept = sum(r["nnz"] for r in records)
    log.info("sparsify %s %s: %d layers, %.1f%% of their weights pruned", cfg.method, cfg.pattern, len(records),
             100 * (1 - kept / total))
    return records
