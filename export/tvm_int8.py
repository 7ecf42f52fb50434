"""MatMulNBits at ``accuracy_level`` 4 on TVM: int8 activations and byte dot products (AVX-512 VNNI or AVX2).

ONNX Runtime's MatMulNBits with ``accuracy_level`` 4 quantizes its input to int8 per K-block and
multiplies with integer dot products; the fp32 TVM kernel (:func:`.tvm_kernels.matmul_nbits`)
spends most of its time unpacking codes to floats, which left the TVM library at under half of
ORT's decode speed. :func:`use_int8_kernels` replaces each such node whose weights are constants
by ``edgecompress::MatMulNBitsInt8(A, w, scales[, zeros])``, its weights repacked for
:func:`.tvm_kernels.matmul_nbits_int8` (same bits per weight), when the target CPU has VNNI or AVX2. Nodes
at level 0 (fp32 math requested) and anything the kernel does not take keep the fp32 kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx
from onnx import helper, numpy_helper

from .onnx_custom import DOMAIN
from .tvm_act_sparse import _constant, replace_nodes

log = logging.getLogger(__name__)

INT8 = "MatMulNBitsInt8"


@dataclass
class Int8Result:
    linears: int = 0                                   # nodes now on the int8 kernel
    kept: list[str] = field(default_factory=list)      # level-4 nodes left on the fp32 kernel, and why


def _reason(model: onnx.ModelProto, node: onnx.NodeProto, attrs: dict) -> str | None:
    if int(attrs.get("bits", 4)) not in (4, 8):
        return f"{attrs.get('bits')}-bit codes"
    if int(attrs["block_size"]) % 8:
        return f"block size {attrs['block_size']} (the kernel takes multiples of 8)"
    if any(x for x in node.input[4:]):
        return "g_idx or bias inputs"
    if any(_constant(model, x) is None for x in node.input[1:4] if x):
        return "weights, scales or zero points are not constants"
    return None


def use_int8_kernels(model: onnx.ModelProto, *, isa: str = "vnni") -> Int8Result:
    """Replace, in place, every ``accuracy_level`` 4 ``MatMulNBits`` the int8 kernel takes, for the
    byte dot product ``isa`` (the caller checks the CPU: :func:`.tvm_kernels.int8_isa`). Old
    initializers are left for pruning."""
    from .tvm_kernels import INT8_ISA_CODES, pack_nbits_int8

    g = model.graph
    result = Int8Result()
    nodes, inits = [], []
    for node in g.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("accuracy_level", 0)) != 4:
            nodes.append(node)
            continue
        reason = _reason(model, node, attrs)
        if reason is not None:
            result.kept.append(f"{node.name}: {reason}")
            log.info("MatMulNBits %s keeps the fp32 kernel: %s", node.name, reason)
            nodes.append(node)
            continue
        k, n, bits, block = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))
        zp = _constant(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
        w, s, z = pack_nbits_int8(_constant(model, node.input[1]), _constant(model, node.input[2]), zp,
                                  k, n, bits, block)
        base = f"{node.output[0]}/int8"
        arrays = {f"{base}.w": w, f"{base}.scales": s} | ({f"{base}.zeros": z} if z is not None else {})
        inits.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
        nodes.append(helper.make_node(INT8, [node.input[0], *arrays], list(node.output), name=node.name,
                                      domain=DOMAIN, K=k, N=n, bits=bits, block_size=block,
                                      int8=INT8_ISA_CODES[isa]))
        result.linears += 1
    if result.linears:
        replace_nodes(model, nodes, inits)
    return result
