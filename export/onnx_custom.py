"""Custom-domain ONNX ops for formats ONNX Runtime has no kernel for, with function bodies.

``edgecompress::MatMulBlockQuantized(A, B, scales)`` multiplies ``A [..., K]`` by a weight stored
as symmetric 3-bit codes in blocks along K, packed as three bit planes per block (the layout of
``edgecompress.compress.quant.formats.pack_codes``): ``B`` uint8 ``[N, n_blocks, 3 * block / 8]``,
``scales`` float ``[N, n_blocks]``, ``w = (code - 4) * scale``. The model carries the op's
function body in standard ONNX ops (BitShift, BitwiseAnd, ...), so every ONNX runtime runs it;
a runtime with a native kernel (TVM, CUDA) can take the op itself. The body reads every size
from its inputs' shapes, so one function serves every layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "edgecompress"
MATMUL_BQ = "MatMulBlockQuantized"
MID_3BIT = 4


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def matmul_block_quantized_function(opset: int) -> onnx.FunctionProto:
    """The function body of ``edgecompress::MatMulBlockQuantized`` (3-bit planes, symmetric)."""
    n = helper.make_node
    nodes = [
        _const("shifts", np.arange(8, dtype=np.uint8)),
        _const("one_u8", np.array(1, np.uint8)),
        _const("plane_w", np.array([1, 2, 4], np.float32).reshape(1, 1, 3, 1, 1)),
        _const("mid", np.array(MID_3BIT, np.float32)),
        _const("axis2", np.array([2], np.int64)),
        _const("axis_last", np.array([-1], np.int64)),
        _const("shape5", np.array([0, 0, 3, -1, 1], np.int64)),
        _const("zero1", np.array([0], np.int64)),
        _const("minus1", np.array([-1], np.int64)),
        _const("k_axis", np.array([1], np.int64)),
        # bit planes [N, nb, 3, block/8, 1] -> bits [N, nb, 3, block/8, 8]
        n("Reshape", ["B", "shape5"], ["planes"]),
        n("BitShift", ["planes", "shifts"], ["shifted"], direction="RIGHT"),
        n("BitwiseAnd", ["shifted", "one_u8"], ["bits"]),
        n("Cast", ["bits"], ["bits_f"], to=TensorProto.FLOAT),
        n("Mul", ["bits_f", "plane_w"], ["weighted"]),
        n("ReduceSum", ["weighted", "axis2"], ["codes5"], keepdims=0),  # [N, nb, block/8, 8]
        n("Shape", ["B"], ["b_shape"]),
        n("Slice", ["b_shape", "zero1", "axis2", "zero1"], ["n_nb"]),  # [N, nb]
        n("Concat", ["n_nb", "minus1"], ["shape3"], axis=0),
        n("Reshape", ["codes5", "shape3"], ["codes"]),  # [N, nb, block]
        n("Sub", ["codes", "mid"], ["centered"]),
        n("Unsqueeze", ["scales", "axis_last"], ["scales3"]),
        n("Mul", ["centered", "scales3"], ["w_blocks"]),
        n("Slice", ["b_shape", "zero1", "k_axis", "zero1"], ["n_only"]),
        n("Concat", ["n_only", "minus1"], ["shape2"], axis=0),
        n("Reshape", ["w_blocks", "shape2"], ["w_padded"]),  # [N, nb * block]
        n("Shape", ["A"], ["a_shape"]),
        n("Gather", ["a_shape", "minus1"], ["k"], axis=0),  # K, as a 1-element tensor
        n("Slice", ["w_padded", "zero1", "k", "k_axis"], ["w"]),  # drop the last block's padding
        n("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        n("MatMul", ["A", "w_t"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, MATMUL_BQ, ["A", "B", "scales"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)])


MATMUL_FP4 = "MatMulFP4"


def matmul_fp4_function(opset: int, values: np.ndarray) -> onnx.FunctionProto:
    """The function body of ``edgecompress::MatMulFP4(A, B, scales)``: ``B`` uint8 ``[N, n_blocks, block/2]``
    holds two E2M1 codes per byte (low nibble first), ``values`` is the 16-entry code -> value table,
    ``w = values[code] * scale``; the last block's padding is dropped, then ``Y = A @ wᵀ``."""
    n = helper.make_node
    nodes = [
        _const("lut", values.astype(np.float32)),
        _const("low4", np.array(15, np.uint8)),
        _const("four", np.array(4, np.uint8)),
        _const("axis_last", np.array([-1], np.int64)),
        _const("zero1", np.array([0], np.int64)),
        _const("two1", np.array([2], np.int64)),
        _const("minus1", np.array([-1], np.int64)),
        _const("k_axis", np.array([1], np.int64)),
        n("BitwiseAnd", ["B", "low4"], ["lo"]),
        n("BitShift", ["B", "four"], ["hi"], direction="RIGHT"),
        n("Unsqueeze", ["lo", "axis_last"], ["lo5"]),
        n("Unsqueeze", ["hi", "axis_last"], ["hi5"]),
        n("Concat", ["lo5", "hi5"], ["pairs"], axis=-1),  # [N, nb, block/2, 2]
        n("Shape", ["B"], ["b_shape"]),
        n("Slice", ["b_shape", "zero1", "two1", "zero1"], ["n_nb"]),
        n("Concat", ["n_nb", "minus1"], ["shape3"], axis=0),
        n("Reshape", ["pairs", "shape3"], ["codes"]),  # [N, nb, block]
        n("Cast", ["codes"], ["codes64"], to=TensorProto.INT64),
        n("Gather", ["lut", "codes64"], ["vals"], axis=0),
        n("Unsqueeze", ["scales", "axis_last"], ["scales3"]),
        n("Mul", ["vals", "scales3"], ["w_blocks"]),
        n("Slice", ["b_shape", "zero1", "k_axis", "zero1"], ["n_only"]),
        n("Concat", ["n_only", "minus1"], ["shape2"], axis=0),
        n("Reshape", ["w_blocks", "shape2"], ["w_padded"]),
        n("Shape", ["A"], ["a_shape"]),
        n("Gather", ["a_shape", "minus1"], ["k"], axis=0),
        n("Slice", ["w_padded", "zero1", "k", "k_axis"], ["w"]),
        n("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        n("MatMul", ["A", "w_t"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, MATMUL_FP4, ["A", "B", "scales"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)])
