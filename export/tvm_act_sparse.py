"""Activation-sparse int4 linears on TVM: ``ActSparse`` then ``MatMulNBits`` becomes one native kernel.

In the graph :func:`.tvm.prepare` imports (custom ops inlined, constants folded) each
``edgecompress::ActSparse`` is its function body ``Where(Greater(Abs(X), thr), X, 0)``.
:func:`fuse_act_sparse` finds that pattern and replaces every 4-bit ``MatMulNBits`` reading its
output by ``edgecompress::ActSparseMatMulNBits(X, thr [K], w, scales[, zeros])``, whose weights are
repacked input-major (:func:`.tvm_kernels.pack_act_sparse_nbits`; still 4 bits per weight) so the
kernel (:func:`.tvm_kernels.act_sparse_matmul_nbits`) reads only the rows of active inputs. A
shared input (unfused q/k/v or gate/up) gives one fused node per consumer. What does not match
(a threshold that is not a constant scalar or ``[K]`` vector, 8-bit codes, g_idx/bias inputs, a
consumer that is not MatMulNBits) keeps the function body, with a log line saying why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_custom import DOMAIN

log = logging.getLogger(__name__)

FUSED = "ActSparseMatMulNBits"


@dataclass
class FusionResult:
    linears: int = 0          # MatMulNBits nodes now run by the sparse kernel
    sites: int = 0            # ActSparse patterns found
    function_body_sites: int = 0  # patterns with a consumer the kernel does not take
    skipped: list[str] = field(default_factory=list)  # why, one line per pattern or consumer


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> None:
    """Set ``model``'s nodes to ``nodes``, add ``initializers`` and the custom domain's opset (the
    commit step of every rewrite onto a native TVM kernel; dead nodes and initializers are left for
    :func:`.tvm.prune_dead`)."""
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(initializers)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def match_act_sparse(model: onnx.ModelProto, where: onnx.NodeProto, producers: dict) -> tuple[str, str] | str:
    """``(X, threshold name)`` if ``where`` is ActSparse's body ``Where(Greater(Abs(X), thr), X, 0)``,
    else the reason it is not."""
    if where.op_type != "Where":
        return "not a Where"
    gt = producers.get(where.input[0])
    if gt is None or gt.op_type != "Greater":
        return "condition is not Greater"
    ab = producers.get(gt.input[0])
    if ab is None or ab.op_type != "Abs" or ab.input[0] != where.input[1]:
        return "Greater does not compare Abs of the kept value"
    zero = _constant(model, where.input[2])
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
        return "the else-branch is not a constant 0"
    return where.input[1], gt.input[1]


def _linear_reason(model: onnx.ModelProto, node: onnx.NodeProto, out: str) -> str | None:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or node.input[0] != out:
        return f"consumer {node.name!r} is {node.op_type}, not MatMulNBits on this input"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("bits", 4)) != 4:
        return f"{node.name!r}: {attrs.get('bits')}-bit codes (the kernel takes 4)"
    if any(x for x in node.input[4:]):
        return f"{node.name!r}: g_idx or bias inputs"
    if any(_constant(model, x) is None for x in node.input[1:4] if x):
        return f"{node.name!r}: weights, scales or zero points are not constants"
    return None


def fuse_act_sparse(model: onnx.ModelProto, *, parts: int = 2, int8: str | None = None) -> FusionResult:
    """Replace, in place, each 4-bit ``MatMulNBits`` fed by an ActSparse body with the fused op
    (``parts``: the kernel's thread count). With ``int8`` (the CPU's byte dot product, ``"vnni"`` or
    ``"avx2"``), a MatMulNBits at ``accuracy_level`` 4 gets the int8-activation
    variant (attribute ``int8``: :data:`.tvm_kernels.INT8_ISA_CODES`, weights in
    :func:`.tvm_kernels.pack_act_sparse_int8`'s layout). Dead nodes and initializers are left for
    the caller."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for x in set(n.input):
            consumers[x].append(n)
    graph_outputs = {o.name for o in g.output}
    result = FusionResult()
    new_inits: list[onnx.TensorProto] = []
    replaced: dict[int, onnx.NodeProto] = {}
    for where in g.node:
        m = match_act_sparse(model, where, producers)
        if isinstance(m, str):
            continue
        result.sites += 1
        x, thr_name = m
        thr = _constant(model, thr_name)
        out = where.output[0]
        kept = out in graph_outputs
        thr_k: dict[int, str] = {}
        for node in consumers[out]:
            reason = _linear_reason(model, node, out)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k = int(attrs.get("K", 0))
            if reason is None and (thr is None or thr.size not in (1, k) or (thr.size == k and thr.ndim != 1)):
                reason = (f"threshold {thr_name!r} is not a constant" if thr is None else
                          f"threshold {thr_name!r} has shape {list(thr.shape)} (the kernel takes a scalar or [{k}])")
            if reason is not None:
                kept = True
                result.skipped.append(f"{where.name or out}: {reason}")
                log.info("ActSparse %s stays a function body for %s: %s", where.name or out, node.name, reason)
                continue
            n, block = int(attrs["N"]), int(attrs["block_size"])
            b, s = _constant(model, node.input[1]), _constant(model, node.input[2])
            zp = _constant(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            from .tvm_kernels import INT8_ISA_CODES, pack_act_sparse_int8, pack_act_sparse_nbits

            use_int8 = bool(int8) and int(attrs.get("accuracy_level", 0)) == 4
            w, st, zt = (pack_act_sparse_int8(b, s, zp, k, n, block, isa=int8) if use_int8
                         else pack_act_sparse_nbits(b, s, zp, k, n, block))
            if k not in thr_k:
                thr_k[k] = f"{thr_name}/k{k}"
                new_inits.append(numpy_helper.from_array(np.broadcast_to(thr.astype(np.float32).reshape(-1), (k,))
                                                         .copy(), thr_k[k]))
            base = f"{node.output[0]}/act_sparse"
            arrays = {f"{base}.w": w, f"{base}.scales": st} | ({f"{base}.zeros": zt} if zt is not None else {})
            new_inits.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
            replaced[id(node)] = helper.make_node(FUSED, [x, thr_k[k], *arrays], [node.output[0]], name=node.name,
                                                  domain=DOMAIN, K=k, N=n, block_size=block, parts=int(parts),
                                                  int8=INT8_ISA_CODES[int8] if use_int8 else 0)
            result.linears += 1
        result.function_body_sites += kept
    if replaced:
        replace_nodes(model, [replaced.get(id(n), n) for n in g.node], new_inits)
    return result
