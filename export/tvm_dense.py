"""Dense fp32 linears on TVM: ``MatMul`` by a constant weight onto a native GEMV kernel.

After :func:`.tvm.prepare` folds constants, an fp32 linear is ``MatMul(A, W^T)`` with ``W^T [K, N]`` a
constant; Relax's generic ``matmul`` for it ran at under 1 GB/s (SmolLM2's fp32 head: 190 ms per
token). :func:`use_dense_kernels` replaces each such node by ``edgecompress::MatMulF32(A, W)`` with
the weight stored transposed, ``W [N, K]`` (each output's weights contiguous), run by
:func:`.tvm_kernels.matmul_f32`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_custom import DOMAIN
from .tvm_act_sparse import _constant, replace_nodes

DENSE = "MatMulF32"


def use_dense_kernels(model: onnx.ModelProto, *, min_weights: int = 4096) -> int:
    """Replace, in place, every ``MatMul(A, constant float32 [K, N])`` with at least ``min_weights``
    weights (smaller ones are not worth a kernel call of their own); returns how many."""
    g = model.graph
    nodes, inits, count = [], [], 0
    for node in g.node:
        wt = _constant(model, node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if wt is None or wt.ndim != 2 or wt.dtype != np.float32 or wt.size < min_weights:
            nodes.append(node)
            continue
        name = f"{node.output[0]}/dense.w"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(wt.T), name))
        nodes.append(helper.make_node(DENSE, [node.input[0], name], list(node.output), name=node.name or name,
                                      domain=DOMAIN, K=int(wt.shape[0]), N=int(wt.shape[1])))
        count += 1
    if count:
        replace_nodes(model, nodes, inits)
    return count
