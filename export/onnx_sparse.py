"""ONNX form of the sparse weight format (``edgecompress.compress.sparse.format.SparseTensor``).

``edgecompress::SparseMatMul(A, values, bitmask, shape) -> Y = A @ W^T`` where ``W [N, K]`` is stored
compressed: ``values`` float ``[nnz]`` (the kept weights, row-major), ``bitmask`` uint8
``[N, ceil(K/8)]`` (bit ``j % 8`` of byte ``j // 8``, least significant first) and ``shape`` int64
``[N, K]``. The model carries the op's function body in standard ONNX ops, so every ONNX runtime
runs it; a runtime with a sparse kernel (TVM, CUDA) can take the op itself. The body decompresses as ``to_float()`` does::

    keep  = bits of bitmask, [N, K]                 (BitShift, BitwiseAnd, Slice)
    index = cumsum(keep) * keep                     (1..nnz where kept, 0 where pruned)
    W     = Gather(Concat([0], values), index)      (0 where pruned)

Every size comes from the ``shape`` initializer, so one function serves every layer and the whole
decompression depends on initializers only: ONNX Runtime folds it into a dense constant once, at
session creation (reading K from ``A``'s shape would keep CumSum/Gather in every run). Values are
stored as float16 when that is lossless (the sparsify step rounds them so) and cast to float32 in
the graph. So the artifact is compressed on disk, while ONNX Runtime computes with a dense fp32
weight (no sparse kernel yet: memory and speed as the fp32 export).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecompress.compress.sparse.format import SparseLinear

from .graph import FLOAT, GraphBuilder
from .onnx_custom import DOMAIN, _const
from .onnx_formats import LayerFormat

SPARSE_MATMUL = "SparseMatMul"


def sparse_matmul_function(opset: int) -> onnx.FunctionProto:
    """The function body of ``edgecompress::SparseMatMul`` (values + LSB-first bitmask)."""
    n = helper.make_node
    nodes = [
        _const("shifts", np.arange(8, dtype=np.uint8)),
        _const("one_u8", np.array(1, np.uint8)),
        _const("zero1", np.array([0], np.int64)),
        _const("one1", np.array([1], np.int64)),
        _const("two1", np.array([2], np.int64)),
        _const("minus1", np.array([-1], np.int64)),
        _const("zero_value", np.array([0.0], np.float32)),
        # bitmask [N, K8] -> keep [N, K] (0/1)
        n("Unsqueeze", ["bitmask", "minus1"], ["bm3"]),
        n("BitShift", ["bm3", "shifts"], ["shifted"], direction="RIGHT"),
        n("BitwiseAnd", ["shifted", "one_u8"], ["bits3"]),  # [N, K8, 8]
        n("Slice", ["shape", "zero1", "one1", "zero1"], ["n_only"]),  # [N]
        n("Slice", ["shape", "one1", "two1", "zero1"], ["k"]),  # [K]
        n("Concat", ["n_only", "minus1"], ["shape_nk8"], axis=0),
        n("Reshape", ["bits3", "shape_nk8"], ["bits_padded"]),  # [N, K8 * 8]
        n("Slice", ["bits_padded", "zero1", "k", "one1"], ["bits"]),  # [N, K]
        n("Cast", ["bits"], ["keep"], to=TensorProto.INT64),
        n("Reshape", ["keep", "minus1"], ["keep_flat"]),
        n("CumSum", ["keep_flat", "zero1"], ["rank"]),
        n("Mul", ["rank", "keep_flat"], ["index"]),  # 1..nnz where kept, 0 where pruned
        n("Concat", ["zero_value", "values"], ["values0"], axis=0),
        n("Gather", ["values0", "index"], ["w_flat"], axis=0),
        n("Reshape", ["w_flat", "shape"], ["w"]),
        n("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        n("MatMul", ["A", "w_t"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, SPARSE_MATMUL, ["A", "values", "bitmask", "shape"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)])


def emit_sparse_linear(g: GraphBuilder, x: str, mod: SparseLinear, base: str) -> tuple[str, LayerFormat]:
    """``y = x @ W^T`` (bias added by the caller) as ``edgecompress::SparseMatMul``."""
    sp = mod.sparse
    n, k = sp.shape
    if not any(f.domain == DOMAIN and f.name == SPARSE_MATMUL for f in g.functions):
        g.functions.append(sparse_matmul_function(g.opset))
    values = sp.values.detach().cpu().numpy().astype(np.float32)
    half = values.astype(np.float16)
    if np.array_equal(half.astype(np.float32), values):
        stored = g.initializer(f"{base}.values_f16", half)
        v = g.op("Cast", stored, name=f"{base}/cast_values", to=TensorProto.FLOAT)
        vbytes, vtag = half.nbytes, "fp16"
    else:
        v = g.initializer(f"{base}.values", values)
        vbytes, vtag = values.nbytes, "fp32"
    bm = g.initializer(f"{base}.bitmask", sp.bitmask.detach().cpu().numpy())
    shape = g.initializer(f"{base}.shape", np.array([n, k], np.int64))
    y = g.op(SPARSE_MATMUL, x, v, bm, shape, name=f"{base}/{SPARSE_MATMUL}", domain=DOMAIN)
    g.value_info.append(helper.make_tensor_value_info(y, FLOAT, None))
    nbytes = vbytes + sp.bitmask.numel() + 16
    fmt = LayerFormat(base, f"sparse-{mod.pattern}-{vtag}", f"{DOMAIN}::{SPARSE_MATMUL}", 8 * nbytes / (n * k),
                      n * k, nbytes, shape=(n, k), initializers={"values": v, "bitmask": bm, "shape": shape})
    return y, fmt
