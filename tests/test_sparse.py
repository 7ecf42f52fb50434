"""Weight sparsity against numerical oracles: exact N:M counts, Wanda = a NumPy reference, SparseGPT's
layer error below magnitude's, the compressed format and its ONNX function body, composition with quantization."""

import copy
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecompress.compress.calibration.observers import HessianObserver, MeanSquareObserver
from edgecompress.compress.quant.formats import QuantScheme
from edgecompress.compress.quant.gptq import GPTQConfig, gptq_quantize, layer_error
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.sparse.apply import SparsifyConfig, apply_sparsify, sparsify_weight
from edgecompress.compress.sparse.format import SparseLinear, SparseTensor, pack_bitmask, unpack_bitmask
from edgecompress.compress.sparse.masks import magnitude_scores, select_mask, wanda_scores
from edgecompress.compress.sparse.sparsegpt import sparsegpt_prune
from edgecompress.errors import EdgeCompressError, RecipeError
from edgecompress.export.graph import FLOAT, GraphBuilder
from edgecompress.export.onnx_formats import EmitOptions, WeightCache, emit_linear
from edgecompress.export.onnx_llm import build_llama_decoder


def activations(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few outlier channels (what makes Wanda and SparseGPT matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    x += torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 10.0
    return x


def layer(n: int, k: int, seed: int = 0):
    x = activations(2048, k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    h, ms = HessianObserver(), MeanSquareObserver()
    h.update(x)
    ms.update(x)
    return w, x, h.state()["hessian"], ms.state()["meansq"]


METHODS = ["magnitude", "wanda", "sparsegpt"]


def prune(method, w, h, ms, sparsity, pattern):
    stat = {"magnitude": None, "wanda": ms, "sparsegpt": h}[method]
    return sparsify_weight(w, SparsifyConfig(method=method, sparsity=sparsity, pattern=pattern), stat)


# -- masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_keeps_exactly_n_of_every_m(method, pattern, n, m):
    w, _, h, ms = layer(48, 96)
    wp, keep, _ = prune(method, w, h, ms, 0.0, pattern)
    assert (keep.reshape(48, 96 // m, m).sum(-1) == n).all()
    assert (wp[~keep] == 0).all()
    assert (wp[keep] != 0).all()  # nothing kept is accidentally zero (seeded data has no zeros)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_prunes_the_exact_count(method, sparsity):
    n, k = 40, 200
    w, _, h, ms = layer(n, k)
    wp, keep, _ = prune(method, w, h, ms, sparsity, "unstructured")
    if method == "wanda":  # compared per output row
        assert (keep.sum(1) == k - int(sparsity * k)).all()
    elif method == "magnitude":  # compared over the layer
        assert int(keep.sum()) == n * k - int(sparsity * n * k)
    else:  # per lazy block of 128 columns: 128 + 72
        assert int((~keep).sum()) == int(sparsity * n * 128) + int(sparsity * n * 72)
    assert (wp[~keep] == 0).all()


def test_wanda_mask_equals_numpy_reference():
    w, x, _, ms = layer(32, 80)
    keep = select_mask(wanda_scores(w, ms), 0.5, per_row=True)
    # independent reference: |W_ij| * ||X_j||_2 from the raw activations, lowest half of each row pruned
    xn = np.sqrt((x.double().numpy() ** 2).sum(0))
    metric = np.abs(w.double().numpy()) * xn[None, :]
    ref = np.ones_like(metric, dtype=bool)
    idx = np.argsort(metric, axis=1, kind="stable")[:, :40]
    np.put_along_axis(ref, idx, False, axis=1)
    np.testing.assert_array_equal(keep.numpy(), ref)
    # and 2:4: the two largest of every four, NumPy-side
    keep24 = select_mask(wanda_scores(w, ms), 0.5, "2:4")
    groups = metric.reshape(32, 20, 4)
    ref24 = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(ref24, np.argsort(-groups, axis=-1, kind="stable")[..., :2], True, axis=-1)
    np.testing.assert_array_equal(keep24.numpy(), ref24.reshape(32, 80))
    # the outlier channels make Wanda's mask differ from magnitude's
    assert (keep != select_mask(magnitude_scores(w), 0.5, per_row=True)).any()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("n,k", [(48, 96), (64, 256), (24, 520)])
def test_sparsegpt_layer_error_below_magnitude_and_wanda(pattern, n, k):
    if pattern != "unstructured" and k % int(pattern[-1]):
        pytest.skip("K does not divide by M")
    w, _, h, ms = layer(n, k)
    err = {m: layer_error(w, prune(m, w, h, ms, 0.5, pattern)[0], h) for m in METHODS}
    assert err["sparsegpt"] < 0.7 * err["magnitude"], err
    assert err["sparsegpt"] < err["wanda"], err
    assert err["wanda"] < err["magnitude"], err


def test_sparsegpt_with_no_pruning_is_the_identity_and_dead_inputs_are_zeroed():
    w, _, h, _ = layer(16, 64)
    wp, keep, diag = sparsegpt_prune(w, h, 0.0)
    assert keep.all() and torch.equal(wp, w)
    h[5, :] = h[:, 5] = 0
    wp, keep, diag = sparsegpt_prune(w, h, 0.5)
    assert diag["dead_columns"] == 1 and (wp[:, 5] == 0).all()


# -- bad input ----------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(tiny_llama):
    w, _, h, _ = layer(8, 30)
    with pytest.raises(ValueError, match="divide by M"):
        select_mask(w.abs(), 0.5, "2:4")
    with pytest.raises(ValueError, match="divide by M"):
        sparsegpt_prune(w, h, 0.5, "4:8")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            select_mask(w.abs(), bad)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            SparsifyConfig(sparsity=bad)
    # N:M on a model whose dimensions do not divide by M: one error naming the layers, before any change
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(RecipeError, match="divide by 5") as info:
        apply_sparsify(model, torch.zeros(1, 8, dtype=torch.long), SparsifyConfig(method="magnitude", pattern="3:5"))
    assert "model.layers.0.self_attn.q_proj (K=64)" in str(info.value) and info.value.hint
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with pytest.raises(EdgeCompressError, match="matches no module"):
        apply_sparsify(model, torch.zeros(1, 8, dtype=torch.long), SparsifyConfig(targets=("qkv_proj",)))


@pytest.mark.parametrize("body,needle", [
    ("{sparsity: 1.0}", "steps[0].sparsify.sparsity: must be < 1.0, got 1.0"),
    ("{sparsity: -0.5}", "steps[0].sparsify.sparsity: must be >= 0"),
    ("{pattern: '2:4', sparsity: 0.7}", "contradicts pattern 2:4"),
    ("{pattern: '4:4'}", "is not a sparsity pattern"),
    ("{method: obs}", "'obs' is not one of 'magnitude', 'wanda', 'sparsegpt'"),
])
def test_recipe_errors_name_the_key(body, needle):
    from edgecompress.recipe import parse_recipe

    text = textwrap.dedent(f"""\
        name: x
        model: {{source: tiny-llama}}
        steps:
          - sparsify: {body}
        export: [{{format: onnx}}]
        """)
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "x.yaml")
    assert needle in str(info.value) and "x.yaml line 4" in str(info.value)


# -- the format and its ONNX op ----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 577])
def test_bitmask_round_trip_matches_numpy_packbits(k):
    mask = torch.rand(9, k, generator=torch.Generator().manual_seed(k)) > 0.4
    packed = pack_bitmask(mask)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, k), mask)
    w = torch.randn(9, k)
    st = SparseTensor.from_dense(w, mask)
    assert torch.equal(st.to_float(), w * mask) and st.nnz == int(mask.sum())


def _session(mod: nn.Module, k: int):
    g = GraphBuilder("t")
    x = g.input("x", FLOAT, ["m", k])
    y, fmt = emit_linear(g, x, mod, "layer", EmitOptions(accuracy_level=0), WeightCache())
    g.node("Identity", [y], outputs=["y"])
    g.output("y", FLOAT, None)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    proto = g.model()
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]), fmt, proto


@pytest.mark.parametrize("n,k,pattern,bias,dtype", [
    (40, 72, "2:4", True, "float16"), (17, 13, "unstructured", False, "float32"),
    (96, 576, "4:8", False, "float16"), (8, 1536, "unstructured", True, "float16"),
])
def test_sparse_matmul_function_body_equals_torch_module(n, k, pattern, bias, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    model = nn.Sequential(lin)
    w, keep, _ = sparsify_weight(lin.weight.data, SparsifyConfig(method="magnitude", sparsity=0.6, pattern=pattern))
    if dtype == "float16":
        w = w.half().float()
    mod = SparseLinear(SparseTensor.from_dense(w, keep), lin.bias, pattern=pattern)
    sess, fmt, proto = _session(mod, k)
    assert fmt.onnx_op == "edgecompress::SparseMatMul"
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("edgecompress", 1)}
    assert any(f.name == "SparseMatMul" for f in proto.functions)
    assert any(v.name.endswith("SparseMatMul/out0") for v in proto.graph.value_info)
    x = torch.randn(5, k)
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = mod(x).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    value_bytes = 2 if dtype == "float16" else 4
    assert fmt.stored_bytes == mod.sparse.nnz * value_bytes + n * ((k + 7) // 8) + 16  # + the int64 [N, K]
    assert fmt.format == f"sparse-{pattern}-{'fp16' if dtype == 'float16' else 'fp32'}"
    del model


def _run_decoder(proto, ids):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run(["logits"], feeds)[0][0]


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured")])
def test_sparse_decoder_runs_in_ort_like_torch_and_the_artifact_shrinks(tiny_llama, tmp_path, method, pattern):
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes.torch_ref import load_torch_model

    lm = load_model("tiny-llama")
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    dense_dir.mkdir()
    sparse_dir.mkdir()
    dense_body = export_causal_lm(lm.model, dense_dir, accuracy_level=0)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    records = apply_sparsify(lm.model, ids, SparsifyConfig(method=method, pattern=pattern, sparsity=0.5))
    assert len(records) == 14 and all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in records)
    proto, formats = build_llama_decoder(lm.model, opts=EmitOptions(accuracy_level=0))
    test_ids = torch.randint(0, 260, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm.model(test_ids).logits[0].numpy()
    np.testing.assert_allclose(_run_decoder(proto, test_ids.numpy()), ref, atol=2e-4)
    assert sum(f.onnx_op == "edgecompress::SparseMatMul" for f in formats) == 14
    # the decompression reads initializers only, so ONNX Runtime folds it at session creation
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    import onnx

    folded = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not folded & {"CumSum", "BitShift", "SparseMatMul"}, folded
    # the stored artifact shrinks: 50% fp16 values + 1 bit mask per weight, vs 32 bits
    body = export_causal_lm(lm.model, sparse_dir, accuracy_level=0)
    proj = [f for f in body["layers"] if f["onnx_op"].endswith("SparseMatMul")]
    assert all(f["bits"] == pytest.approx(9.0, abs=0.3) for f in proj)
    dense_bytes = sum(f["stored_bytes"] for f in dense_body["layers"] if f["module"].startswith("model.layers"))
    sparse_bytes = sum(f["stored_bytes"] for f in proj)
    assert sparse_bytes < 0.3 * dense_bytes
    assert (sparse_dir / "model.onnx.data").stat().st_size < (dense_dir / "model.onnx.data").stat().st_size
    # the torch runtime decodes the op's initializers back into exactly the pruned weights
    lm.save_hf_files(sparse_dir)
    write_manifest(sparse_dir, {"task": "causal-lm", **body})
    decoded = load_torch_model(Artifact.load(sparse_dir)).state_dict()
    for name, m in lm.model.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(decoded[f"{name}.weight"], m.dense_weight())


# -- composition with quantization ---------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_after_sparsify_keeps_zeros_exactly_zero(tiny_llama, symmetric):
    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    apply_sparsify(model, ids, SparsifyConfig(method="wanda", pattern="2:4"))
    masks = {n: m.mask() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    apply_rtn(model, RTNConfig(bits=4, group_size=32, symmetric=symmetric, embeddings=False))
    for name, keep in masks.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        w = q.dense_weight()
        assert (w[~keep] == 0).all()
        assert (w[keep] != 0).float().mean() > 0.9  # the kept weights are mostly nonzero codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_a_mask_keeps_zeros_and_beats_masked_rtn(act_order, symmetric):
    w, _, h, ms = layer(48, 128)
    wp, keep, _ = prune("wanda", w, h, ms, 0.5, "2:4")
    scheme = QuantScheme(4, 32, symmetric)
    packed, _ = gptq_quantize(wp, h, scheme, GPTQConfig(act_order=act_order), keep=keep)
    q = packed.to_float()
    assert (q[~keep] == 0).all()
    # without the mask GPTQ's error feedback fills the pruned weights back in
    unmasked, _ = gptq_quantize(wp, h, scheme, GPTQConfig(act_order=act_order))
    assert (unmasked.to_float()[~keep] != 0).float().mean() > 0.1
    from edgecompress.compress.quant.formats import quantize_blockwise

    rtn = quantize_blockwise(wp, scheme).to_float()
    assert (rtn[~keep] == 0).all()
    assert layer_error(w, q, h) < layer_error(w, rtn, h)


def test_sequential_gptq_after_sparsify_keeps_the_mask(tiny_llama):
    from edgecompress.compress.quant.sequential import apply_awq, apply_gptq

    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    apply_sparsify(model, ids, SparsifyConfig(method="sparsegpt", sparsity=0.5))
    masks = {n: m.mask() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    recs = apply_gptq(model, ids, QuantScheme(4, 32, True), GPTQConfig(), embeddings=False)
    assert sum("sparsity" in r for r in recs) == len(masks) == 14
    for name, keep in masks.items():
        assert (model.get_submodule(name).dense_weight()[~keep] == 0).all()
    pruned = copy.deepcopy(tiny_llama)
    apply_sparsify(pruned, ids, SparsifyConfig(method="magnitude"))
    with pytest.raises(EdgeCompressError, match="before sparsify"):
        apply_awq(pruned, ids, None)


# -- the recipe step through the pipeline ---------------------------------------------------


def test_sparsify_recipe_runs_end_to_end_and_both_runtimes_agree(tmp_path):
    from edgecompress.artifact import Artifact
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import parse_recipe
    from edgecompress.runtimes import open_runtime

    text = textwrap.dedent("""\
        name: tiny-sparse
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 64}
        steps:
          - sparsify: {method: sparsegpt, pattern: '2:4', ignore: ['down_proj']}
        export:
          - {format: onnx, name: sparse, accuracy_level: 0}
        check: {runtime: ort-cpu, seq_len: 64, windows: 2}
        """)
    report = run_recipe(parse_recipe(text), tmp_path, progress=False)
    ops = report["exports"]["sparse"]["op_counts"]
    assert ops["edgecompress::SparseMatMul"] == 2 * 6  # q, k, v, o, gate, up per layer; down stays dense
    assert ops["MatMul"] == 2 + 1  # the two down projections and the tied head
    assert set(report["exports"]["sparse"]["params_by_format"]) == {"fp32", "sparse-2:4-fp16"}
    assert report["check"]["passed"] and report["check"]["kl"] > 0
    art = Artifact.load(tmp_path / "tiny-sparse" / "sparse")
    ids = np.arange(5, 45, dtype=np.int64)
    np.testing.assert_allclose(open_runtime("ort-cpu", art).logits(ids), open_runtime("torch", art).logits(ids),
                               atol=1e-4)


# -- OWL allocation -------------------------------------------------------------------------


def test_owl_sparsities_keep_the_mean_and_favour_outlier_rich_layers():
    from edgecompress.compress.sparse.masks import outlier_ratio, owl_sparsities

    ratios = [0.01, 0.05, 0.02, 0.08]
    s = owl_sparsities(ratios, 0.5, 0.08)
    assert np.mean(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)  # the ratios span [0, 2 * lambda]
    assert np.argsort(s).tolist() == np.argsort(ratios)[::-1].tolist()  # more outliers, less pruning
    assert owl_sparsities([0.03] * 3, 0.6) == pytest.approx([0.6] * 3)
    with pytest.raises(ValueError, match="lambda"):
        owl_sparsities(ratios, 0.05, 0.08)
    x = torch.cat([torch.ones(95), torch.full((5,), 100.0)])  # mean 5.95: 5 scores above 5 x mean
    assert outlier_ratio(x, 5.0) == pytest.approx(0.05)
    assert outlier_ratio(x, 20.0) == 0.0


def test_owl_allocation_prunes_each_block_at_its_own_sparsity(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    recs = apply_sparsify(model, ids, SparsifyConfig(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1))
    per_block = {r["module"].split(".")[2]: r["target_sparsity"] for r in recs}
    assert len(set(per_block.values())) == 2 and np.mean(list(per_block.values())) == pytest.approx(0.5)
    assert sorted(per_block.values()) == pytest.approx([0.4, 0.6])  # two blocks: the extremes
    for r in recs:  # Wanda prunes floor(s * K) of every row
        n, k = r["shape"]
        assert r["nnz"] == n * (k - int(r["target_sparsity"] * k))
    with pytest.raises(ValueError, match="unstructured"):
        SparsifyConfig(allocation="owl", pattern="2:4")


@pytest.mark.parametrize("body,needle", [
    ("{allocation: owl, pattern: '2:4'}", "steps[0].sparsify.allocation: owl allocation varies"),
    ("{allocation: owl, sparsity: 0.1, owl_lambda: 0.2}", "steps[0].sparsify.owl_lambda: owl_lambda 0.2 must be below"),
])
def test_owl_recipe_errors(body, needle):
    test_recipe_errors_name_the_key(body, needle)
