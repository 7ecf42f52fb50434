"""ONNX form of a low-rank corrected linear (``edgecompress.compress.lowrank.apply.LowRankLinear``).

Plain ONNX, runs everywhere: ``y = base(x) + MatMul(MatMul(x, A^T), B^T)`` with ``A^T [K, r]`` and
``B^T [r, N]`` stored as initializers (float16 with a Cast when lossless: the step rounds the factors
so), the base layer emitted in its own format (``MatMulNBits``, ``SparseMatMul``, ...). The manifest
row is the base layer's, with ``lowrank_a``/``lowrank_b`` initializers and their bytes added.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgecompress.compress.lowrank.apply import LowRankLinear

from .graph import GraphBuilder
from .onnx_formats import EmitOptions, LayerFormat, WeightCache, emit_linear


def _factor(g: GraphBuilder, name: str, t: np.ndarray) -> tuple[str, int]:
    half = t.astype(np.float16)
    if np.array_equal(half.astype(np.float32), t):
        stored = g.initializer(f"{name}_f16", half)
        return g.op("Cast", stored, name=f"{name}/cast", to=TensorProto.FLOAT), half.nbytes
    return g.initializer(name, t), t.nbytes


def emit_lowrank_linear(g: GraphBuilder, x: str, mod: LowRankLinear, base: str, opts: EmitOptions,
                        cache: WeightCache) -> tuple[str, LayerFormat]:
    y, fmt = emit_linear(g, x, mod.base, base, opts, cache)  # the base's bias is added there
    a_t, abytes = _factor(g, f"{base}.lowrank_a_t", mod.A.detach().cpu().numpy().astype(np.float32).T.copy())
    b_t, bbytes = _factor(g, f"{base}.lowrank_b_t", mod.B.detach().cpu().numpy().astype(np.float32).T.copy())
    xa = g.op("MatMul", x, a_t, name=f"{base}/lowrank_a")
    y = g.op("Add", y, g.op("MatMul", xa, b_t, name=f"{base}/lowrank_b"), name=f"{base}/lowrank_add")
    fmt.format = f"{fmt.format}+{mod.method}-r{mod.rank}"
    fmt.stored_bytes += abytes + bbytes
    fmt.bits = 8 * fmt.stored_bytes / fmt.params
    fmt.initializers.update(lowrank_a=a_t, lowrank_b=b_t)
    return y, fmt
