"""The lowrank transform: wrap compressed decoder linears in ``LowRankLinear`` (compressed + ``B A``).

The error to compensate is ``dW = W - W_c``: ``W`` comes from the uncompressed reference model (the
pipeline keeps a copy from before the steps), ``W_c`` from the compressed module (``QuantLinear``,
``SparseLinear``). EoRA runs block by block through the one sequential calibration driver: block
``i``'s input covariance is observed on the outputs of the already compressed *and compensated*
blocks ``0..i-1``. SVD needs no data.

The reference must still describe the same function basis as the model: a step that rewrites
weights and norms together (AWQ's folded scales) makes ``W - W_c`` meaningless, so the transform
refuses when a norm weight differs between the two models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, sequential_calibrate
from edgecompress.compress.calibration.store import StatsStore
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rtn import _set_module, check_targets, select
from edgecompress.compress.quant.sequential import (LINEAR_TYPES, OBSERVED, _block_prefix, _drop, decoder_blocks,
                                                    stat_source)
from edgecompress.compress.sparse.format import SparseLinear
from edgecompress.errors import EdgeCompressError, RecipeError

from .eora import eora_lowrank, svd_lowrank, weighted_error

log = logging.getLogger(__name__)

COMPRESSED = (QuantLinear, SparseLinear)


class LowRankLinear(nn.Module):
    """``y = base(x) + (x A^T) B^T``: a compressed linear plus a rank-r correction."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, *, method: str = "eora"):
        super().__init__()
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"low-rank factors {tuple(B.shape)} x {tuple(A.shape)} do not fit "
                             f"[{base.out_features}, {base.in_features}]")
        self.base = base
        self.method = method
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("A", A.detach().to(torch.float32).contiguous())
        self.register_buffer("B", B.detach().to(torch.float32).contiguous())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def dense_weight(self) -> torch.Tensor:
        return self.base.dense_weight() + self.B @ self.A

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}"


@dataclass(frozen=True)
class LowRankConfig:
    method: str = "eora"  # eora | svd
    rank: int = 16
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    value_dtype: str = "float16"  # the factors are rounded to this storage dtype
    eps: float = 1e-6  # EoRA: eigenvalue floor, relative to the largest

    def __post_init__(self) -> None:
        if self.method not in ("eora", "svd"):
            raise ValueError(f"method must be eora or svd, got {self.method!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


def _round(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32) if dtype == "float16" else t


def _targets(model: nn.Module, reference: nn.Module, cfg: LowRankConfig) -> dict[str, nn.Module]:
    blocks = decoder_blocks(model)
    check_targets(model, cfg.targets)
    inside = {id(m) for b in blocks for m in b.modules()}
    chosen = {n: m for n, m in model.named_modules()
              if id(m) in inside and isinstance(m, COMPRESSED) and select(n, cfg.targets, cfg.ignore)}
    if not chosen:
        raise RecipeError("lowrank finds no compressed (quantized or pruned) linear layer inside the decoder blocks",
                          hint="put lowrank after a quantize or sparsify step, and check targets/ignore")
    ref_params = dict(reference.named_parameters())
    changed = [n for n, p in model.named_parameters() if "norm" in n and n in ref_params
               and not torch.equal(p.detach(), ref_params[n].detach())]
    if changed:
        raise EdgeCompressError(f"lowrank: {changed[0]} differs from the uncompressed model (an awq step folded "
                                "scales into it), so W - W_compressed is not the compression error",
                                hint="drop awq from a recipe that uses lowrank, or compensate without awq")
    check_rank("lowrank", chosen, cfg.rank)
    return chosen


def check_rank(step: str, layers: dict[str, nn.Module], rank: int) -> None:
    """A rank-``rank`` factor pair must fit every layer: a clear error naming the layers it does not."""
    too_big = [f"{n} [{m.out_features}, {m.in_features}]" for n, m in layers.items()
               if rank > min(m.out_features, m.in_features)]
    if too_big:
        raise RecipeError(f"{step} rank {rank} exceeds the smaller dimension of {', '.join(too_big[:3])}"
                          + (f" and {len(too_big) - 3} more" if len(too_big) > 3 else ""),
                          hint="choose a rank below min(out_features, in_features), or ignore those layers")


def _compensate(model: nn.Module, name: str, mod: nn.Module, W: torch.Tensor, cfg: LowRankConfig,
                H: torch.Tensor | None) -> dict[str, Any]:
    dW = W.detach().to(torch.float32) - mod.dense_weight()
    if cfg.method == "eora":
        B, A = eora_lowrank(dW, H, cfg.rank, cfg.eps)
    else:
        B, A = svd_lowrank(dW, cfg.rank)
    B, A = _round(B, cfg.value_dtype), _round(A, cfg.value_dtype)
    _set_module(model, name, LowRankLinear(mod, A, B, method=cfg.method))
    rec: dict[str, Any] = {"module": name, "format": "lowrank", "method": cfg.method, "rank": cfg.rank,
                           "shape": list(dW.shape), "value_dtype": cfg.value_dtype,
                           "fro_before": float(dW.norm()), "fro_after": float((dW - B @ A).norm())}
    if H is not None:
        n = dW.shape[0]
        rec["output_error_before"] = weighted_error(dW, H) / n
        rec["output_error_after"] = weighted_error(dW - B @ A, H) / n
    return rec


def apply_lowrank(model: nn.Module, reference: nn.Module, batches: torch.Tensor, cfg: LowRankConfig, *,
                  progress: bool = False, batch_size: int = 1) -> list[dict[str, Any]]:
    """Add a rank-``cfg.rank`` correction to every selected compressed decoder linear, in place."""
    chosen = _targets(model, reference, cfg)
    records: list[dict[str, Any]] = []

    def original(name: str) -> torch.Tensor:
        return reference.get_submodule(name).weight

    if cfg.method == "svd":
        for name, mod in chosen.items():
            records.append(_compensate(model, name, mod, original(name), cfg, None))
    else:
        blocks = decoder_blocks(model)

        def on_block(i: int, block: nn.Module, store: StatsStore) -> None:
            prefix = _block_prefix(model, block)
            for name, mod in list(block.named_modules()):
                full = f"{prefix}.{name}"
                if full in chosen:
                    H = store.get(stat_source(full), "hessian")["hessian"]
                    records.append(_compensate(model, full, mod, original(full), cfg, H))
            _drop(store, prefix)

        types = LINEAR_TYPES + (LowRankLinear,)
        sequential_calibrate(model, batches, blocks, [StatRequest(OBSERVED, "hessian", module_types=types)],
                             on_block, progress=progress, batch_size=batch_size)
    log.info("lowrank %s r%d: %d layers", cfg.method, cfg.rank, len(records))
    return records
