"""Sparse weights on TVM: ``edgecompress::SparseMatMul`` onto a native CSR kernel.

The ONNX export stores a pruned linear compressed (kept values, fp16 when lossless, and a bitmask;
:mod:`.onnx_sparse`). Its function body rebuilds the dense matrix from initializers only, so after
:func:`.tvm.prepare` inlines and constant-folds it, the graph holds a dense ``MatMul(A, W^T)`` with
``W^T`` a folded constant. :func:`sparse_outputs` records, before inlining, which outputs are
SparseMatMul's; :func:`use_sparse_kernels` then replaces the ``MatMul`` that produces each of them
by ``edgecompress::SparseMatMulCSR(A, row_ptr, cols, vals)``: only the kept weights (as float16
when the export stored them so, which it does only when that is exact) with uint16 column indices
(:func:`.tvm_kernels.pack_sparse_csr`), run by :func:`.tvm_kernels.sparse_matmul_csr`, which reads
only them. A weight with at most 2 of every 4 inputs kept (2:4, 1:4) on an AVX-512 CPU gets
``edgecompress::SparseMatMul2of4(A, idx, vals)`` instead (:func:`.tvm_kernels.sparse_matmul_2of4`: 2-bit
positions and the values, 5 bytes per 4 weights at fp16, no gather). A folded form the rewrite
does not recognise keeps the dense MatMul, with a log line saying why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_custom import DOMAIN
from .tvm_act_sparse import _constant, replace_nodes

log = logging.getLogger(__name__)

SOURCE = "SparseMatMul"
CSR = "SparseMatMulCSR"
NM = "SparseMatMul2of4"


@dataclass
class SparseResult:
    linears: int = 0
    kept: list[str] = field(default_factory=list)  # SparseMatMul outputs left dense, and why


def sparse_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """``{output name: value dtype}`` of every ``SparseMatMul`` node (call before inlining); the dtype
    is that of the stored values (float16 behind the export's Cast, else float32)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type == SOURCE and node.domain == DOMAIN:
            src = producers.get(node.input[1])
            stored = _constant(model, src.input[0]) if src is not None and src.op_type == "Cast" else None
            out[node.output[0]] = "float16" if stored is not None and stored.dtype == np.float16 else "float32"
    return out


def use_sparse_kernels(model: onnx.ModelProto, outputs: dict[str, str], *,
                       two_of_four: str | None = None) -> SparseResult:
    """Replace, in place, the folded ``MatMul(A, constant W^T)`` behind each of ``outputs`` by the CSR
    op, or, with ``two_of_four`` (the CPU's lane permute, ``"avx512"`` or ``"avx2"``:
    :func:`.tvm_kernels.permute_isa`) and at most 2 of every 4 weights kept, by the 2:4 op (the
    dense constant is left for pruning)."""
    from .tvm_kernels import PERMUTE_ISA_CODES, is_2of4, pack_sparse_2of4, pack_sparse_csr

    g = model.graph
    result = SparseResult()
    nodes, inits = [], []
    for node in g.node:
        if not node.output or node.output[0] not in outputs:
            nodes.append(node)
            continue
        wt = _constant(model, node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        reason = None
        if wt is None or wt.ndim != 2:
            reason = f"folded to {node.op_type}, not a MatMul by a constant 2-D weight"
        elif wt.shape[0] > 65535:
            reason = f"K = {wt.shape[0]} (the kernel's column indices are uint16)"
        if reason is not None:
            result.kept.append(f"{node.output[0]}: {reason}")
            log.info("sparse weight %s stays dense: %s", node.output[0], reason)
            nodes.append(node)
            continue
        w = np.ascontiguousarray(wt.T)  # [N, K]
        n, k = w.shape
        mask = w != 0
        dtype = outputs[node.output[0]]
        if two_of_four and is_2of4(mask):
            idx, vals = pack_sparse_2of4(w, mask, dtype)
            base = f"{node.output[0]}/2of4"
            arrays = {f"{base}.idx": idx, f"{base}.vals": vals}
            op, attrs = NM, {"isa": PERMUTE_ISA_CODES[two_of_four]}
        else:
            row_ptr, cols, vals = pack_sparse_csr(w[mask].astype(dtype), np.packbits(mask, axis=1, bitorder="little"), n, k)
            base = f"{node.output[0]}/csr"
            arrays = {f"{base}.row_ptr": row_ptr, f"{base}.cols": cols, f"{base}.vals": vals}
            op, attrs = CSR, {"nnz": int(row_ptr[-1])}
        inits.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
        nodes.append(helper.make_node(op, [node.input[0], *arrays], list(node.output), name=node.name or base,
                                      domain=DOMAIN, K=k, N=n, value_dtype=dtype, **attrs))
        result.linears += 1
    if result.linears:
        replace_nodes(model, nodes, inits)
    return result
