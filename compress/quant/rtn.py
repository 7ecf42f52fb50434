"""Round-to-nearest (RTN) weight quantization: the baseline every calibrated method beats.

Pure core: :func:`edgecompress.compress.quant.formats.quantize_blockwise`. This module is the
thin transform that selects modules by regex and swaps them for packed modules.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from edgecompress.compress.sparse.format import SparseLinear
from edgecompress.errors import EdgeCompressError

from .formats import BlockQuantizedTensor, QuantScheme, quantize_blockwise
from .fp4 import FP4Tensor, quantize_fp4
from .modules import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    group_size: int = 128  # 0: per output channel
    symmetric: bool = True
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    embeddings: bool = True
    scale_dtype: str = "float16"
    dtype: str = "int"

    @classmethod
    def from_scheme(cls, scheme: QuantScheme, **selection) -> RTNConfig:
        """RTN with ``scheme``'s format; ``selection``: targets / ignore / embeddings."""
        return cls(bits=scheme.bits, group_size=scheme.block_size, symmetric=scheme.symmetric,
                   scale_dtype=scheme.scale_dtype, dtype=scheme.dtype, **selection)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, block_size=self.group_size, symmetric=self.symmetric,
                           scale_dtype=self.scale_dtype, dtype=self.dtype)


@dataclass
class QuantRecord:
    """What the step did to one module (goes to the manifest)."""

    module: str
    format: str
    bits: int
    block_size: int
    symmetric: bool
    shape: tuple[int, int]
    shared_with: list[str] = field(default_factory=list)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> BlockQuantizedTensor | FP4Tensor:
    """Round-to-nearest in ``scheme``'s format: integer blocks or fp4 (E2M1) blocks."""
    if scheme.dtype == "fp4":
        return quantize_fp4(w, scheme.block_size, scheme.scale_dtype)
    return quantize_blockwise(w, scheme)


def select(name: str, targets: tuple[str, ...], ignore: tuple[str, ...]) -> bool:
    return any(re.search(t, name) for t in targets) and not any(re.search(i, name) for i in ignore)


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every ``targets`` regex must match some module name; else a clear error with close matches."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(re.search(t, n) for n in names):
            close = difflib.get_close_matches(t, names, n=3, cutoff=0.4)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise EdgeCompressError(
                f"targets pattern {t!r} matches no module of {type(model).__name__}",
                hint=(f"close matches: {', '.join(close)}; " if close else "")
                + f"module names end in: {', '.join(leaves[:20])}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _tied_output(model: nn.Module, emb: nn.Module) -> tuple[str, nn.Linear] | None:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    if isinstance(out, nn.Linear) and out.weight is emb.weight:
        name = next(n for n, m in model.named_modules() if m is out)
        return name, out
    return None


def apply_rtn(model: nn.Module, cfg: RTNConfig) -> list[QuantRecord]:
    """Quantize matching ``nn.Linear`` layers (and the embedding, with its tied head) in place."""
    check_targets(model, cfg.targets)
    scheme = cfg.scheme
    records: list[QuantRecord] = []
    skip: set[str] = set()

    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in else None
    tied = _tied_output(model, emb) if isinstance(emb, nn.Embedding) else None
    if isinstance(emb, nn.Embedding):
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        if tied:
            skip.add(tied[0])
        if cfg.embeddings and select(emb_name, cfg.targets, cfg.ignore):
            packed = quantize_weight(emb.weight, scheme)
            _set_module(model, emb_name, QuantEmbedding(packed, emb.padding_idx))
            rec = QuantRecord(emb_name, f"block_{scheme.dtype}", scheme.bits, packed.block_size, scheme.symmetric,
                              packed.shape)
            if tied:
                _set_module(model, tied[0], QuantLinear(packed, tied[1].bias))
                rec.shared_with.append(tied[0])
            records.append(rec)
        elif tied:
            log.info("%s stays fp32: it is tied to the embedding and embeddings: false", tied[0])

    for name, mod in list(model.named_modules()):
        # a pruned layer (SparseLinear) quantizes like a Linear: a zero codes as zp and decodes to exactly 0
        if name in skip or not isinstance(mod, (nn.Linear, SparseLinear)) or not select(name, cfg.targets, cfg.ignore):
            continue
        packed = quantize_weight(mod.weight, scheme)
        _set_module(model, name, QuantLinear(packed, mod.bias))
        records.append(QuantRecord(name, f"block_{scheme.dtype}", scheme.bits, packed.block_size, scheme.symmetric,
                                   packed.shape))
    log.info("RTN int%d: quantized %d modules", scheme.bits, len(records))
    return records
