"""int3 and fp4 weights on TVM: ``edgecompress::MatMulBlockQuantized`` / ``MatMulFP4`` onto native kernels.

Both custom ops carry function bodies that rebuild the float32 weight from its packed codes, so
after :func:`.tvm.prepare` inlines and constant-folds them the graph holds ``MatMul(A, constant W^T)``
(what ran before these kernels: the weight decompressed to fp32 at compile time). :func:`lowbit_outputs`
records, before inlining, each such node's output with its packed codes and scales;
:func:`use_lowbit_kernels` then replaces the folded ``MatMul`` that produces each output by
``edgecompress::MatMulInt3(A, B, scales)`` (:func:`.tvm_kernels.matmul_int3`: three bit planes per
block, tested per bit, no unpacking) or ``edgecompress::MatMulE2M1(A, B, scales)``
(:func:`.tvm_kernels.matmul_nbits` with ``e2m1``: two codes per byte, decoded in the inner loop). The
codes stay as the export stored them (3 or 4 bits per weight); the scales become float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_custom import DOMAIN, MATMUL_BQ, MATMUL_FP4
from .tvm_act_sparse import _constant, replace_nodes

log = logging.getLogger(__name__)

INT3 = "MatMulInt3"
E2M1 = "MatMulE2M1"


@dataclass
class LowbitResult:
    linears: int = 0
    kept: list[str] = field(default_factory=list)  # outputs left on the folded fp32 weight, and why
    done: set[str] = field(default_factory=set)    # outputs now on a native kernel

    def all_native(self, source: onnx.ModelProto) -> set[str]:
        """``domain::op`` of the custom ops of ``source`` (the graph before inlining) whose every node
        now runs a native kernel: no longer run as function bodies."""
        ops: dict[str, bool] = {}
        for node in source.graph.node:
            if node.domain == DOMAIN and node.op_type in (MATMUL_BQ, MATMUL_FP4):
                name = f"{DOMAIN}::{node.op_type}"
                ops[name] = ops.get(name, True) and node.output[0] in self.done
        return {name for name, native in ops.items() if native}


def lowbit_outputs(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{output: (native op, packed codes, float32 scales [N, n_blocks])}`` of every int3/fp4 custom node
    whose codes and scales are constants (scales possibly behind the export's float16 ``Cast``); call
    before inlining."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in (MATMUL_BQ, MATMUL_FP4):
            continue
        codes = _constant(model, node.input[1])
        src = producers.get(node.input[2])
        scales = _constant(model, src.input[0] if src is not None and src.op_type == "Cast" else node.input[2])
        if codes is None or scales is None or codes.ndim != 3 or scales.shape != codes.shape[:2]:
            log.info("%s %s keeps its function body: codes or scales are not constants of the export's layout",
                     node.op_type, node.name)
            continue
        out[node.output[0]] = (INT3 if node.op_type == MATMUL_BQ else E2M1, codes, scales.astype(np.float32))
    return out


def use_lowbit_kernels(model: onnx.ModelProto, outputs: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> LowbitResult:
    """Replace, in place, the folded ``MatMul(A, constant W^T)`` behind each of ``outputs`` (from
    :func:`lowbit_outputs`) by its native op; the dense constant is left for pruning."""
    g = model.graph
    result = LowbitResult()
    nodes, inits = [], []
    for node in g.node:
        if not node.output or node.output[0] not in outputs:
            nodes.append(node)
            continue
        op, codes, scales = outputs[node.output[0]]
        if node.op_type != "MatMul" or len(node.input) != 2:
            reason = f"its function body ended in {node.op_type}, not the MatMul the rewrite expects"
            result.kept.append(f"{node.output[0]}: {reason}")
            log.info("%s stays a dense fp32 MatMul: %s", node.output[0], reason)
            nodes.append(node)
            continue
        # the body's last node is MatMul(A, weight rebuilt from the codes, sliced to A's K): the
        # rebuilt weight (constant, or a Slice of one when K comes from A's symbolic shape) is dropped
        n, nb, blob = codes.shape
        block = blob * 8 // 3 if op == INT3 else blob * 2
        base = f"{node.output[0]}/{op}"
        inits += [numpy_helper.from_array(np.ascontiguousarray(codes), f"{base}.B"),
                  numpy_helper.from_array(np.ascontiguousarray(scales.reshape(-1)), f"{base}.scales")]
        nodes.append(helper.make_node(op, [node.input[0], f"{base}.B", f"{base}.scales"], list(node.output),
                                      name=node.name or base, domain=DOMAIN, N=n, block_size=block))
        result.linears += 1
        result.done.add(node.output[0])
    if result.linears:
        replace_nodes(model, nodes, inits)
    return result
