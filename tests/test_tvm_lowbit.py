"""int3 and fp4 weights on TVM: the kernels against NumPy, the rewrite of the exported custom ops against
ONNX Runtime's function bodies, and a tiny Llama end to end (tvm-cpu against ort-cpu)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

tvm = pytest.importorskip("tvm")

from edgecompress.compress.quant.formats import QuantScheme, pack_codes, quantize_blockwise
from edgecompress.compress.quant.fp4 import E2M1_VALUES, quantize_fp4
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.export import tvm as tvm_export
from edgecompress.export import tvm_kernels as kern

from test_tvm import _run  # compile one kernel, run it, return its last argument

SHAPES = [  # K, N, block, rows
    (64, 48, 32, 1),
    (96, 40, 64, 3),     # K padded to 2 blocks; odd N; prefill rows
    (576, 33, 128, 2),   # SmolLM2's hidden size, blocks of 128 (padding)
    (40, 5, 16, 1),      # K not a multiple of the block, N below one vector
]


@pytest.mark.parametrize("k,n,block,m", SHAPES)
def test_int3_kernel_matches_numpy(k, n, block, m):
    rng = np.random.default_rng(k + n)
    nb = -(-k // block)
    codes = rng.integers(0, 8, (n, nb * block))
    codes[0] = 7  # all bits set in every plane
    codes[-1] = 0  # no bit set
    b = pack_codes(torch.tensor(codes), 3, block).numpy()
    s = rng.random((n, nb)).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = ((codes.reshape(n, nb, block) - 4) * s[..., None]).reshape(n, -1)[:, :k]
    y = _run(kern.matmul_int3(k, n, block), [a, b, s.reshape(-1), np.zeros((m, n), np.float32)])
    ref = a @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("k,n,block,m", SHAPES)
def test_e2m1_kernel_matches_numpy(k, n, block, m):
    rng = np.random.default_rng(k + n)
    nb = -(-k // block)
    codes = rng.integers(0, 16, (n, nb * block))
    codes[0, :16] = np.arange(16)  # every code, the denormal one (0.5) included
    b = pack_codes(torch.tensor(codes), 4, block).numpy()
    s = rng.random((n, nb)).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (E2M1_VALUES.numpy()[codes].reshape(n, nb, block) * s[..., None]).reshape(n, -1)[:, :k]
    y = _run(kern.matmul_nbits(k, n, 4, block, zero_points=False, e2m1=True),
             [a, b, s.reshape(-1), np.zeros((m, n), np.float32)])
    ref = a @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _linear_model(packed, k):
    """``x [rows, K] -> y``: one exported int3/fp4 linear (custom op + function body, float16 scales), its
    output the graph's (an Identity after it would be folded away, output name and all)."""
    from edgecompress.export.graph import FLOAT, GraphBuilder
    from edgecompress.export.onnx_formats import EmitOptions, WeightCache, emit_linear

    g = GraphBuilder("t")
    x = g.input("x", FLOAT, ["m", k])
    y, fmt = emit_linear(g, x, QuantLinear(packed), "layer", EmitOptions(accuracy_level=0), WeightCache())
    g.output(y, FLOAT, None)
    return g.model(), fmt


@pytest.mark.parametrize("kind", ["int3", "fp4"])
def test_lowbit_rewrite_matches_ort_function_body(kind):
    import onnxruntime as ort
    from tvm import relax

    from edgecompress.export.npu import fold_constants
    from edgecompress.export.tvm_lowbit import E2M1, INT3, lowbit_outputs, use_lowbit_kernels

    torch.manual_seed(0)
    k, n = 200, 24
    w = torch.randn(n, k)
    packed = quantize_blockwise(w, QuantScheme(3, 64, True)) if kind == "int3" else quantize_fp4(w, 32)
    model, fmt = _linear_model(packed, k)
    assert fmt.onnx_op == f"edgecompress::{'MatMulBlockQuantized' if kind == 'int3' else 'MatMulFP4'}"
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    marked = lowbit_outputs(model)
    assert len(marked) == 1
    m = fold_constants(onnx.inliner.inline_local_functions(model))
    done = use_lowbit_kernels(m, marked)
    assert done.linears == 1 and not done.kept
    assert done.all_native(model) == {fmt.onnx_op}
    m = tvm_export.prune_dead(m)
    op = INT3 if kind == "int3" else E2M1
    assert op in [node.op_type for node in m.graph.node] and "MatMul" not in [node.op_type for node in m.graph.node]
    codes = next(t for t in m.graph.initializer if t.name.endswith(".B"))
    assert codes.data_type == onnx.TensorProto.UINT8 and tuple(codes.dims) == tuple(packed.qweight.shape)
    mod, params = tvm_export.import_relax(m)
    vm = relax.VirtualMachine(tvm_export.compile_library(mod, kern.target_llvm(threads=2)), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x, tvm.cpu()), *[tvm.runtime.tensor(p, tvm.cpu()) for p in params]).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


TINY_RECIPE = """
name: tiny-llama-tvm-lowbit
model: {source: tiny-llama}
calibration: {data: 'pydoc:calib', samples: 2, seq_len: 32}
steps:
  - quantize: {%s, embeddings: false}
export:
  - {format: onnx, name: q}
"""


@pytest.mark.parametrize("kind,step,op,kernel", [
    ("int3", "bits: 3, group_size: 32", "edgecompress::MatMulBlockQuantized", "matmul_int3"),
    ("fp4", "dtype: fp4, group_size: 32", "edgecompress::MatMulFP4", "matmul_e2m1"),
])
def test_lowbit_tiny_llama_on_tvm_equals_ort(tmp_path, kind, step, op, kernel):
    from edgecompress.artifact import Artifact
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import load_recipe
    from edgecompress.runtimes import open_runtime

    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE % step)
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path, progress=False, bench=False)
    art = Artifact.load(tmp_path / "tiny-llama-tvm-lowbit" / "q")
    info = tvm_export.build_decoder(art.onnx_path, tmp_path / "lib", threads=2)
    # every int3/fp4 linear runs its kernel on the packed codes; none is rebuilt as an fp32 weight
    assert info["kernels"][kernel] == art.manifest["onnx"]["op_counts"][op] > 0
    assert op not in info["function_body_ops"]
    ids = np.random.default_rng(3).integers(0, 256, 24)
    ort_logits = open_runtime("ort-cpu", art).logits(ids)
    tvm_logits = open_runtime("tvm-cpu", art, threads=2).logits(ids)
    np.testing.assert_allclose(tvm_logits, ort_logits, atol=1e-4 * np.abs(ort_logits).max())
    assert (tvm_logits.argmax(-1) == ort_logits.argmax(-1)).all()
