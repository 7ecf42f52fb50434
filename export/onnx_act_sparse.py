"""ONNX form of activation-sparse linears (``edgecompress.compress.sparse.activation.ActSparseLinear``).

``edgecompress::ActSparse(X, threshold) -> Y = Where(|X| > threshold, X, 0)``: ``threshold`` is a
float32 scalar (TEAL) or one value per input channel ``[K]`` (WINA, whose column norms are folded
in), stored as an initializer: the op carries its data. It is emitted once per shared input (q/k/v,
gate/up read one ``Y``) in front of the linear(s), which keep their own weight format
(``MatMulNBits``, QDQ, ``MatMul``, ``SparseMatMul``, ...). The model carries the op's function body
in standard ops, so every ONNX runtime runs it (dense: the zeros are multiplied); a runtime with a
kernel that skips the zeroed weight columns (TVM, CUDA) can take the op, with the linear after it, itself.

CATS puts the same op on each MLP's gated activation ``silu(gate)``, before the product with ``up``;
its threshold is named ``model.layers.N.mlp.cats_threshold`` and listed on the block's down_proj
manifest row (``initializers.cats_threshold``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from edgecompress.compress.sparse.activation import ActSparseLinear, CatsActivation

from .graph import FLOAT, GraphBuilder
from .onnx_custom import DOMAIN, _const
from .onnx_formats import EmitOptions, LayerFormat, WeightCache, emit_linear

ACT_SPARSE = "ActSparse"


def act_sparse_function(opset: int) -> onnx.FunctionProto:
    """The function body of ``edgecompress::ActSparse``: keep ``X`` where ``|X| > threshold``, else 0."""
    n = helper.make_node
    nodes = [
        _const("zero", np.array(0.0, np.float32)),
        n("Abs", ["X"], ["magnitude"]),
        n("Greater", ["magnitude", "threshold"], ["keep"]),
        n("Where", ["keep", "X", "zero"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, ACT_SPARSE, ["X", "threshold"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)])


def emit_act_sparse(g: GraphBuilder, x: str, mod: ActSparseLinear | CatsActivation,
                    suffix: str = "act_threshold") -> tuple[str, str, bool]:
    """``edgecompress::ActSparse(x)`` for ``mod``'s site (an activation-sparse linear's input, or a CATS
    MLP's gated activation), emitted once per site: (output, threshold name, whether this call emitted it)."""
    thr_name = f"{mod.site}.{suffix}"
    out = f"{mod.site}/ActSparse/out0"
    if thr_name in g.initializers:  # a layer sharing the site's input (unfused q/k/v, gate/up) reuses it
        return out, thr_name, False
    if not any(f.domain == DOMAIN and f.name == ACT_SPARSE for f in g.functions):
        g.functions.append(act_sparse_function(g.opset))
    g.initializer(thr_name, mod.threshold.detach().cpu().numpy().astype(np.float32))
    g.node(ACT_SPARSE, [x, thr_name], name=f"{mod.site}/ActSparse", domain=DOMAIN, outputs=[out])
    g.value_info.append(helper.make_tensor_value_info(out, FLOAT, None))
    return out, thr_name, True


CATS_SUFFIX = "cats_threshold"  # the initializer (and the down_proj manifest row's key) of a CATS threshold


def emit_cats(g: GraphBuilder, act: str, mod: CatsActivation) -> tuple[str, str]:
    """CATS: ``edgecompress::ActSparse`` on the MLP's gated activation (before the product with ``up``)."""
    out, thr, _ = emit_act_sparse(g, act, mod, CATS_SUFFIX)
    return out, thr


def emit_act_sparse_linear(g: GraphBuilder, x: str, mod: ActSparseLinear, base: str, opts: EmitOptions,
                           cache: WeightCache) -> tuple[str, LayerFormat]:
    """The site's ``ActSparse`` then the inner linear in its own format; the manifest row is the inner
    layer's, with ``+act-sparse`` and the threshold (its bytes counted once per site) added."""
    xs, thr, new = emit_act_sparse(g, x, mod)
    y, fmt = emit_linear(g, xs, mod.inner, base, opts, cache)
    fmt.format = f"{fmt.format}+act-sparse-{mod.method}"
    fmt.onnx_op = f"{DOMAIN}::{ACT_SPARSE}+{fmt.onnx_op}"
    fmt.stored_bytes += 4 * mod.threshold.numel() if new else 0
    fmt.bits = 8 * fmt.stored_bytes / fmt.params
    fmt.initializers["act_threshold"] = thr
    return y, fmt
