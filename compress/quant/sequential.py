"""Adapters that run calibration-driven quantizers block by block over a decoder.

One pass of :func:`~edgecompress.compress.calibration.driver.sequential_calibrate` per step:
block ``i`` is observed on the outputs of blocks ``0..i-1`` *as already modified*, then
modified itself (AWQ scales/clips, or GPTQ quantizes), so later blocks calibrate on what the
compressed model really computes. Layers that read the same input (q/k/v; gate/up) share one
Hessian, observed once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, calibrate, sequential_calibrate
from edgecompress.compress.calibration.store import StatsStore
from edgecompress.compress.sparse.format import SparseLinear
from edgecompress.errors import EdgeCompressError

from .formats import BlockQuantizedTensor, QuantScheme, SplitRowsTensor, split_rows
from .gptq import GPTQConfig, float_target_weight, gptq_quantize
from .modules import QuantEmbedding, QuantLinear
from .rtn import QuantRecord, _set_module, _tied_output, check_targets, select

log = logging.getLogger(__name__)

SchemeFor = Callable[[str], "QuantScheme | None"]

# layers whose input is another layer's input: their statistics are read from that layer
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj",  # Llama
                "key": "query", "value": "query"}  # BERT self-attention
OBSERVED = r"\.(q_proj|o_proj|gate_proj|down_proj)$"
# modules whose inputs are observed: plain, pruned (a later GPTQ keeps the zeros) or already quantized
LINEAR_TYPES = (nn.Linear, SparseLinear, QuantLinear)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise NotImplementedError(f"{type(model).__name__}: GPTQ/AWQ/mixed precision need a decoder with "
                                  "model.layers (Llama family); use method: rtn for this model")
    return blocks


def stat_source(name: str) -> str:
    """The module whose input statistics stand for ``name``'s input."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.{SHARED_INPUT[leaf]}" if leaf in SHARED_INPUT else name


def _drop(store: StatsStore, prefix: str) -> None:
    for key in [k for k in store.entries if k[0].startswith(prefix + ".")]:
        del store.entries[key]
        store.counts.pop(key, None)


def _block_prefix(model: nn.Module, block: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is block)


def apply_gptq(model: nn.Module, batches: torch.Tensor, scheme: QuantScheme | SchemeFor, cfg: GPTQConfig, *,
               targets: tuple[str, ...] = (".*",), ignore: tuple[str, ...] = (), embeddings: bool = True,
               progress: bool = False, batch_size: int = 1, int8_rows: int = 0) -> list[dict[str, Any]]:
    """GPTQ every matching ``nn.Linear`` of the decoder blocks, sequentially; then the (tied) LM head.

    ``scheme`` is one scheme for every layer, or a function of the module name giving each
    layer's scheme (None: leave the layer alone), as mixed precision plans. The LM head's
    Hessian is the covariance of the final normed hidden states of the already-quantized
    decoder; a tied embedding takes the head's quantized values. ``int8_rows``: that many head rows,
    the tokens the calibration windows use most, are int8 (same blocks) instead (a
    :class:`SplitRowsTensor`).
    """
    scheme_for = scheme if callable(scheme) else (lambda name: scheme)
    check_targets(model, targets)
    blocks = decoder_blocks(model)
    records: list[dict[str, Any]] = []
    requests = [StatRequest(OBSERVED, "hessian", module_types=LINEAR_TYPES)]
    n_tokens = int(batches.numel())

    def on_block(i: int, block: nn.Module, store: StatsStore) -> None:
        prefix = _block_prefix(model, block)
        for name, mod in list(block.named_modules()):
            full = f"{prefix}.{name}"
            sparse = isinstance(mod, SparseLinear)
            plain = type(mod) is nn.Linear or sparse
            sch = scheme_for(full) if plain and select(full, targets, ignore) else None
            if sch is None:
                continue
            H = store.get(stat_source(full), "hessian")["hessian"]
            keep = mod.mask() if sparse else None  # a pruned layer: its zeros stay exactly zero
            W = mod.weight.data
            if cfg.float_targets:
                W = float_target_weight(W, H, store.get(stat_source(full), "cross")["cross"], cfg.damp,
                                        cfg.float_targets)
            packed, diag = gptq_quantize(W, H, sch, cfg, keep=keep)
            if cfg.float_targets:
                diag = {**diag, "float_target_shift": float((W - mod.weight.data).norm() / mod.weight.data.norm())}
            _set_module(model, full, QuantLinear(packed, mod.bias))
            rec = {**asdict(QuantRecord(full, "block_int", sch.bits, packed.block_size, sch.symmetric,
                                        packed.shape)), "gptq": diag}
            records.append({**rec, "sparsity": round(mod.sparse.sparsity, 6)} if sparse else rec)
        _drop(store, prefix)  # this block's Hessians are spent

    sequential_calibrate(model, batches, blocks, requests, on_block, progress=progress, batch_size=batch_size,
                         float_stream=cfg.float_targets > 0)
    if n_tokens < 4 * max(blocks[0].mlp.down_proj.in_features, 1):
        log.warning("GPTQ on %d calibration tokens: Hessians of %d inputs are poorly conditioned; "
                    "damping keeps them solvable, more samples give better results", n_tokens,
                    blocks[0].mlp.down_proj.in_features)
    records += _gptq_head(model, batches, scheme_for, cfg, targets, ignore, embeddings, progress, batch_size,
                          int8_rows)
    return records


def _gptq_head(model: nn.Module, batches: torch.Tensor, scheme_for: SchemeFor, cfg: GPTQConfig,
               targets: tuple[str, ...], ignore: tuple[str, ...], embeddings: bool,
               progress: bool, batch_size: int, int8_rows: int = 0) -> list[dict[str, Any]]:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return []
    head_name = next(n for n, m in model.named_modules() if m is head)
    tied = _tied_output(model, emb) if isinstance(emb, nn.Embedding) else None
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    wanted = (embeddings and select(emb_name, targets, ignore)) if tied else select(head_name, targets, ignore)
    scheme = scheme_for(emb_name if tied else head_name) if wanted else None
    if scheme is None:
        return []
    store = calibrate(model, batches, [StatRequest(f"^{re.escape(head_name)}$", "hessian")], progress=progress,
                      batch_size=batch_size)
    H = store.get(head_name, "hessian")["hessian"]
    extra: dict[str, Any] = {}
    if int8_rows:
        packed, extra = _split_head(head.weight.data, H, scheme, cfg, batches, int8_rows)
    else:
        packed, extra["gptq"] = gptq_quantize(head.weight.data, H, scheme, cfg)
    _set_module(model, head_name, QuantLinear(packed, head.bias))
    rec = QuantRecord(head_name, "block_int", scheme.bits, scheme.block_size, scheme.symmetric, packed.shape)
    if tied:
        _set_module(model, emb_name, QuantEmbedding(packed, emb.padding_idx))
        rec = QuantRecord(emb_name, "block_int", scheme.bits, scheme.block_size, scheme.symmetric, packed.shape,
                          shared_with=[head_name])
    return [{**asdict(rec), **extra}]


def _split_head(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig, batches: torch.Tensor,
                int8_rows: int) -> tuple[SplitRowsTensor, dict[str, Any]]:
    """GPTQ of an LM head whose ``int8_rows`` most frequent calibration tokens get int8 rows (same
    blocks) and the rest ``scheme``. GPTQ treats rows independently, so each part is exact GPTQ."""
    if not isinstance(batches, torch.Tensor) or batches.dtype != torch.int64:
        raise EdgeCompressError("int8_rows picks the rows by token frequency and needs token-id calibration "
                                "windows", hint="use a text calibration set, or drop int8_rows")
    counts = torch.bincount(batches.reshape(-1), minlength=W.shape[0])[: W.shape[0]]
    seen = int((counts > 0).sum())
    if int8_rows > seen:
        log.warning("int8_rows: %d requested, the calibration text uses %d distinct tokens; the other %d int8 rows "
                    "go to the lowest token ids it does not use", int8_rows, seen, int8_rows - seen)
    rows = torch.sort(-counts, stable=True).indices[:int8_rows]  # most used first; ties: lower id first
    fine = QuantScheme(bits=8, block_size=scheme.block_size, symmetric=scheme.symmetric, scale_dtype=scheme.scale_dtype)
    diags: dict[bool, dict] = {}

    def quantize(w: torch.Tensor, hi: bool) -> BlockQuantizedTensor:
        packed, diags[hi] = gptq_quantize(w, H, fine if hi else scheme, cfg)
        return packed

    packed = split_rows(W, rows, quantize)
    covered = float(counts[packed.rows].sum() / counts.sum())
    return packed, {"gptq": diags[False], "gptq_int8_rows": diags[True],
                    "int8_rows": {"count": int(packed.rows.numel()), "calibration_token_share": round(covered, 4)}}


def apply_awq(model: nn.Module, batches: torch.Tensor, cfg: Any, *, progress: bool = False,
              batch_size: int = 1) -> list[dict[str, Any]]:
    """AWQ: search and fold per-channel scales (and clip ranges) block by block; weights stay fp32."""
    from .awq import awq_block_

    blocks = decoder_blocks(model)
    pruned = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if pruned:
        raise EdgeCompressError(f"awq after sparsify: {pruned[0]} (and {len(pruned) - 1} more) is already pruned, "
                                "and AWQ's rescaling would rewrite its stored values",
                                hint="put the awq step before sparsify (awq -> sparsify -> quantize)")
    records: list[dict[str, Any]] = []
    requests = [StatRequest(OBSERVED, "hessian"), StatRequest(OBSERVED, "meansq")]

    def on_block(i: int, block: nn.Module, store: StatsStore) -> None:
        prefix = _block_prefix(model, block)

        def stats(name: str, stat: str) -> dict[str, torch.Tensor]:
            return store.get(stat_source(name), stat)

        records.extend(awq_block_(block, stats, prefix, cfg))
        _drop(store, prefix)

    sequential_calibrate(model, batches, blocks, requests, on_block, progress=progress, batch_size=batch_size)
    return records

