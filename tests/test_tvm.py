"""TVM compilation: native kernels against NumPy references, converters against ONNX Runtime.

The kernels are checked on awkward shapes (K not a multiple of the block, zero points, 8-bit
codes, one and several rows; the int8-activation kernel against a NumPy emulation of its integer
math, on CPUs with VNNI); the whole-decoder converters on the tiny Llama's fp32 artifact (exact)
and int4 artifact (fp32 kernels against ORT's MatMulNBits at accuracy level 0, i.e. fp32 math;
int8 kernels against ORT at level 4).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")

from edgecompress.export import tvm as tvm_export
from edgecompress.export import tvm_kernels as kern

from edgecompress.errors import EdgeCompressError


def _run(func, args):
    func = func.with_attr("global_symbol", "main")  # a standalone kernel needs its exported name
    lib = tvm.compile(tvm.IRModule({"main": func}), target=kern.target_llvm(threads=2))
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _nbits_reference(a, b, scales, zp, k, n, bits, block):
    """MatMulNBits' definition in NumPy: codes per block, low nibble first, minus the zero point."""
    nb = -(-k // block)
    if bits == 4:
        codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb, block).astype(np.float32)
        z = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb] if zp is not None
             else np.full((n, nb), 8)).astype(np.float32)
    else:
        codes = b.astype(np.float32)
        z = (zp if zp is not None else np.full((n, nb), 128)).astype(np.float32)
    w = ((codes - z[:, :, None]) * scales.reshape(n, nb, 1)).reshape(n, nb * block)[:, :k]
    return a @ w.T


@pytest.mark.parametrize("k,n,bits,block,m,zero_points", [
    (64, 48, 4, 32, 1, False),
    (96, 40, 4, 64, 3, True),     # K padded to 2 blocks of 64; odd N; zero points
    (80, 24, 8, 32, 2, False),    # 8-bit codes, K padded
    (128, 16, 8, 64, 1, True),
    (576, 33, 4, 128, 5, False),  # SmolLM2's hidden size with blocks of 128 (padding)
])
def test_matmul_nbits_kernel_matches_numpy(k, n, bits, block, m, zero_points):
    rng = np.random.default_rng(k + n + m)
    nb = -(-k // block)
    b = rng.integers(0, 256, (n, nb, block * bits // 8)).astype(np.uint8)
    scales = rng.random(n * nb).astype(np.float32)
    zp = rng.integers(0, 256, (n, (nb + 1) // 2 if bits == 4 else nb)).astype(np.uint8) if zero_points else None
    a = rng.standard_normal((m, k)).astype(np.float32)
    ref = _nbits_reference(a, b, scales, zp, k, n, bits, block)
    args = [a, b, scales] + ([zp] if zp is not None else []) + [np.zeros((m, n), np.float32)]
    y = _run(kern.matmul_nbits(k, n, bits, block, zero_points=zero_points), args)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _int8_reference(a, b, scales, zp, k, n, bits, block):
    """MatMulNBits at accuracy level 4 in NumPy: activations quantized to int8 per row and K-block
    (scale max|a| / 127, round half to even), integer dot products with the codes, then the scales."""
    nb = -(-k // block)
    ab = np.zeros((a.shape[0], nb * block), np.float32)
    ab[:, :k] = a
    ab = ab.reshape(a.shape[0], nb, block)
    amax = np.abs(ab).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.maximum(amax, np.float32(1e-30)), 0).astype(np.float32)
    q = np.rint(ab * inv[..., None]).astype(np.int64)
    if bits == 4:
        codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb, block).astype(np.int64)
        z = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb] if zp is not None else np.full((n, nb), 8)
    else:
        codes = b.reshape(n, nb, block).astype(np.int64)
        z = zp if zp is not None else np.full((n, nb), 128)
    dot = np.einsum("mbi,nbi->mnb", q, codes) - z[None].astype(np.int64) * q.sum(-1)[:, None, :]
    return (dot.astype(np.float32) * scales.reshape(n, nb)[None] * (amax / np.float32(127))[:, None, :]).sum(-1)


needs_vnni = pytest.mark.skipif(not kern.has_vnni(kern.target_llvm()), reason="this CPU has no AVX-512 VNNI")
needs_int8 = pytest.mark.skipif(kern.int8_isa(kern.target_llvm()) is None, reason="this CPU has no AVX2")
INT8_ISAS = [pytest.param("vnni", marks=needs_vnni), pytest.param("avx2", marks=needs_int8)]


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("k,n,bits,block,m,zero_points", [
    (64, 48, 4, 32, 1, False),
    (96, 40, 4, 64, 3, True),      # K padded to 2 blocks; N not a multiple of the 16-output tile
    (80, 24, 8, 32, 2, False),     # 8-bit codes, K padded
    (128, 16, 8, 64, 1, True),
    (576, 33, 4, 128, 5, False),
    (1536, 576, 4, 128, 1, True),  # SmolLM2's down_proj
    (576, 200, 8, 64, 1, False),   # the int8 head's shape, fewer rows
    (576, 40, 4, 64, 9, True),     # prefill: two 4-row tiles and a last row
    (160, 24, 8, 32, 8, False),    # 8-bit codes, row tiles only
])
def test_int8_activation_kernel_matches_numpy(k, n, bits, block, m, zero_points, isa):
    rng = np.random.default_rng(k + n + m + bits)
    nb = -(-k // block)
    b = rng.integers(0, 256, (n, nb, block * bits // 8)).astype(np.uint8)
    scales = rng.random(n * nb).astype(np.float32)
    zp = rng.integers(0, 256, (n, (nb + 1) // 2 if bits == 4 else nb)).astype(np.uint8) if zero_points else None
    a = rng.standard_normal((m, k)).astype(np.float32)
    a[-1, :block] = 0  # a block of zeros (scale 0)
    w, s, z = kern.pack_nbits_int8(b, scales, zp, k, n, bits, block)
    assert w.nbytes == -(-n // 16) * 16 * nb * block * bits // 8  # still `bits` per weight
    args = [a, w, s] + ([z] if z is not None else []) + [np.full((m, n), np.nan, np.float32)]
    y = _run(kern.matmul_nbits_int8(k, n, bits, block, zero_points=zero_points, isa=isa), args)
    ref = _int8_reference(a, b, scales, zp, k, n, bits, block)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    exact = _nbits_reference(a, b, scales, zp, k, n, bits, block)  # int8 activations: ~1% of the fp32 result
    assert np.abs(y - exact).max() < 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("k,n,m", [(576, 200, 1), (37, 5, 3), (1536, 576, 2), (8, 13, 2)])  # K below 16: tail only
def test_matmul_f32_kernel_matches_numpy(k, n, m):
    rng = np.random.default_rng(k + n)
    a, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    y = _run(kern.matmul_f32(k, n), [a, w, np.full((m, n), np.nan, np.float32)])
    np.testing.assert_allclose(y, a @ w.T, rtol=1e-4, atol=1e-4 * np.abs(a @ w.T).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_kernel_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    v, nb, block = 50, 3, 32
    data = rng.integers(0, 256, (v, nb, block * bits // 8)).astype(np.uint8)
    scales = rng.random((v, nb, 1)).astype(np.float32)
    ids = np.array([0, 7, 7, 49], np.int64)
    codes = np.stack([data & 15, data >> 4], -1).reshape(v, nb, block) if bits == 4 else data
    ref = ((codes.astype(np.float32) - (8 if bits == 4 else 128)) * scales)[ids]
    y = _run(kern.gather_block_quantized(v, nb, data.shape[2], bits, block, zero_points=False),
             [data, ids, scales, np.zeros((4, nb, block), np.float32)])
    np.testing.assert_allclose(y, ref, rtol=1e-6)


@pytest.mark.parametrize("seq,past", [(1, 0), (1, 9), (4, 5), (6, 0)])
def test_attention_kernels_match_numpy(seq, past):
    """Grouped-query attention over a cache: causal mask at positions past..past+seq-1."""
    rng = np.random.default_rng(seq * 10 + past)
    kv, group, d = 2, 3, 16
    total = past + seq
    q = rng.standard_normal((kv, group * seq, d)).astype(np.float32)
    kc = rng.standard_normal((total, kv, d)).astype(np.float32)  # position-major cache
    vc = rng.standard_normal((total, kv, d)).astype(np.float32)
    scale = 0.25
    scores = _run(kern.attention_scores(kv, group, d, scale), [q, kc, np.zeros((kv, group * seq, total), np.float32)])
    ref = np.einsum("hrd,thd->hrt", q, kc) * scale
    rows = np.arange(group * seq) % seq + past
    allowed = np.arange(total)[None, :] <= rows[:, None]
    np.testing.assert_allclose(np.where(allowed, scores, 0), np.where(allowed, ref, 0), rtol=1e-5, atol=1e-5)
    assert (scores[:, ~allowed] < -1e37).all()
    p = rng.random((kv, group * seq, total)).astype(np.float32)
    out = _run(kern.attention_values(kv, d), [p, vc, np.zeros((kv, group * seq, d), np.float32)])
    np.testing.assert_allclose(out, np.einsum("hrt,thd->hrd", p, vc), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 40), (2, 37)])  # SmolLM2's width; odd widths
def test_rms_norm_kernel_matches_numpy(rows, hidden):
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal((rows, hidden)).astype(np.float32) * 3
    w = rng.standard_normal(hidden).astype(np.float32)
    y = _run(kern.rms_norm(hidden, 1e-5), [x, w, np.zeros_like(x)])
    ref = x * w / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq,total", [(1, 1), (1, 7), (3, 3), (4, 9)])
def test_kv_append_writes_the_last_rows_in_place(seq, total):
    func = kern.kv_append(3, 8).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=kern.target_llvm(threads=2))
    buf = tvm.runtime.tensor(np.full((total + 2, 3, 8), -1, np.float32), tvm.cpu())  # capacity beyond the view
    new = np.random.default_rng(seq).standard_normal((seq, 3, 8)).astype(np.float32)
    lib["main"](buf._create_view((total, 3, 8)), tvm.runtime.tensor(new, tvm.cpu()))
    ref = np.full((total + 2, 3, 8), -1, np.float32)
    ref[total - seq:total] = new
    np.testing.assert_array_equal(buf.numpy(), ref)


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    """fp32 and int4 ONNX decoders of the tiny Llama (the seconds-fast recipe)."""
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import load_recipe

    out = tmp_path_factory.mktemp("tvm")
    recipe = load_recipe("recipes/tiny-llama-int4.yaml")
    recipe = recipe.model_copy(update={"check": None, "bench": None})
    run_recipe(recipe, out, progress=False)
    return out / recipe.name


def _ort_decoder(path, accuracy_level=None):
    import onnxruntime as ort

    model = onnx.load(str(path / "model.onnx"))
    if accuracy_level is not None:
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = accuracy_level
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _compare(artifact, tmp_path, accuracy_level, tol, int8=False):
    """Prefill then two decode steps through the library's in-place cache views, against ORT's
    logits and present KV cache (ORT's [1, kv, T, d] vs the library's position-major rows)."""
    from safetensors.numpy import load_file
    from tvm import relax

    info = tvm_export.build_decoder(artifact / "model.onnx", tmp_path / "lib", threads=2, int8=int8)
    assert (info["kernels"].get("matmul_nbits_int8", 0) > 0) == bool(int8)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "lib" / "model.so")), tvm.cpu())
    stored = load_file(str(tmp_path / "lib" / "params.safetensors"))
    params = [tvm.runtime.tensor(stored[k], tvm.cpu()) for k in sorted(stored)]
    sess = _ort_decoder(artifact, accuracy_level)
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    kv = info["kv_cache"]
    ids = np.random.default_rng(0).integers(0, 256, (1, 12)).astype(np.int64)
    cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    buffers = [tvm.runtime.tensor(np.zeros((20, kv["kv_heads"], kv["head_dim"]), np.float32), tvm.cpu())
               for _ in pasts]
    for step_ids in (ids, np.array([[7]], np.int64), np.array([[11]], np.int64)):  # prefill, two decode steps
        width = cache[pasts[0].name].shape[2] + step_ids.shape[1]
        mask = np.ones((1, width), np.int64)
        ref = sess.run(None, {"input_ids": step_ids, "attention_mask": mask, **cache})
        views = [b._create_view((width, kv["kv_heads"], kv["head_dim"])) for b in buffers]
        logits = vm["main"](tvm.runtime.tensor(step_ids, tvm.cpu()), *views, *params).numpy()
        assert logits.shape == ref[0].shape
        np.testing.assert_allclose(logits, ref[0], atol=tol * np.abs(ref[0]).max())
        assert (logits.argmax(-1) == ref[0].argmax(-1)).all()
        cache = {p.name: r for p, r in zip(pasts, ref[1:])}
        for b, r in zip(buffers, ref[1:]):
            np.testing.assert_allclose(b.numpy()[:width].transpose(1, 0, 2)[None], r,
                                       atol=tol * np.abs(r).max() if int8 else 1e-4)
    return info


def test_fp32_decoder_on_tvm_equals_ort(tiny_artifacts, tmp_path):
    info = _compare(tiny_artifacts / "fp32", tmp_path, None, 1e-5)
    assert info["kernels"]["matmul_f32"] > 0  # the linears on the native fp32 GEMV, not Relax's matmul


def test_int4_decoder_on_tvm_equals_ort_fp32_math(tiny_artifacts, tmp_path):
    """MatMulNBits + GatherBlockQuantized through the native kernels: equal to ORT's fp32-compute
    MatMulNBits (accuracy level 0; level 4 quantizes activations to int8 and differs by design)."""
    _compare(tiny_artifacts / "int4", tmp_path, 0, 1e-4)


@pytest.mark.parametrize("isa", INT8_ISAS)
def test_int4_decoder_on_tvm_int8_kernels_matches_ort_level_4(tiny_artifacts, tmp_path, isa):
    """The same artifact with the int8-activation kernels (the default on a CPU with VNNI or AVX2):
    against ORT's MatMulNBits at the artifact's accuracy level 4, which quantizes activations to
    int8 too (its rounding differs in details, hence the looser bound), top-1 equal at every position."""
    _compare(tiny_artifacts / "int4", tmp_path, 4, 2e-2, int8=isa)


def test_unsupported_op_names_node_and_suggests_ort(tmp_path):
    node = onnx.helper.make_node("FancyOp", ["x"], ["y"], name="my_node", domain="example")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("example", 1)])
    with pytest.raises(EdgeCompressError, match=r"example::FancyOp.*my_node") as e:
        tvm_export.import_relax(model)
    assert "ort-cpu" in e.value.hint


def test_constant_folding_fixes_logits_to_keep(tiny_artifacts):
    model = onnx.load(str(tiny_artifacts / "int4" / "model.onnx"))
    prepared, custom = tvm_export.prepare(model, logits_to_keep=0)
    assert "logits_to_keep" not in [i.name for i in prepared.graph.input]
    ops = {n.op_type for n in prepared.graph.node}
    assert not ops & {"Cos", "Sin", "Range", "Where"}  # rotary caches and the keep-slice start folded
    assert custom == []


def test_split_row_head_on_tvm_equals_ort(tmp_path):
    """A tied embedding/head with int8 rows for some tokens (two GatherBlockQuantized / MatMulNBits
    tables, Where and a last-axis Gather) compiles through the same converters and equals ORT."""
    import torch

    from edgecompress.compress.quant.formats import QuantScheme, quantize_blockwise, split_rows
    from edgecompress.compress.quant.modules import QuantEmbedding, QuantLinear
    from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model

    lm = load_model("tiny-llama")
    apply_rtn(lm.model, RTNConfig(bits=4, group_size=32, embeddings=False))
    p = split_rows(lm.model.model.embed_tokens.weight.data, torch.tensor([7, 11, 40, 200]),
                   lambda rows, hi: quantize_blockwise(rows, QuantScheme(8 if hi else 4, 32, True)))
    lm.model.model.embed_tokens = QuantEmbedding(p)
    lm.model.lm_head = QuantLinear(p)
    (tmp_path / "art").mkdir()
    export_causal_lm(lm.model, tmp_path / "art", accuracy_level=0)
    _compare(tmp_path / "art", tmp_path, 0, 1e-4)
