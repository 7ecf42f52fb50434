"""W8A8: activation observers and range methods against NumPy / ONNX Runtime oracles, SmoothQuant
folding exactness, and the exported QDQ graphs (decoder and encoder) against the torch model."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edgecompress.compress.calibration.driver import StatRequest, calibrate
from edgecompress.compress.calibration.observers import SignedHistogramObserver
from edgecompress.compress.quant.activation import (
    affine_params,
    calibrated_act_quant,
    entropy_range,
    mse_range,
    percentile_range,
)
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.quant.smoothquant import fold_sites, smooth_scales, smoothquant_
from edgecompress.compress.quant.w8a8 import calibrate_activations
from edgecompress.export.onnx_encoder import build_bert_encoder
from edgecompress.export.onnx_formats import EmitOptions
from edgecompress.export.onnx_llm import build_llama_decoder
from edgecompress.models import load_model


def _heavy_tailed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) + 0.5
    x[:50] *= 40  # a few large outliers
    return x


def _signed(x: torch.Tensor, bins: int = 2048) -> tuple[np.ndarray, np.ndarray, SignedHistogramObserver]:
    obs = SignedHistogramObserver(bins)
    for chunk in x.reshape(-1, 1).split(10_000):
        obs.update(chunk)
    counts, edges = obs.signed()
    return counts, edges, obs


def test_signed_histogram_matches_numpy_and_merges():
    x = _heavy_tailed()
    counts, edges, obs = _signed(x)
    ref, _ = np.histogram(x.numpy(), bins=edges)
    assert counts.sum() == x.numel()
    # bins are [a, b) from zero outwards on both sides; NumPy's are [a, b) left to right: they
    # differ only for values exactly on an edge, of which a continuous sample has none
    np.testing.assert_array_equal(counts, ref)
    a, b = SignedHistogramObserver(2048), SignedHistogramObserver(2048)
    a.update(x[:1000].reshape(-1, 1))
    b.update(x[1000:].reshape(-1, 1))
    merged = a.merge(b)
    assert merged.upper == obs.upper or merged.upper >= float(x.abs().max())
    assert merged.signed()[0].sum() == x.numel()
    # state round-trip
    again = SignedHistogramObserver.from_state(obs.state(), obs.count)
    np.testing.assert_array_equal(again.signed()[0], counts.astype(np.float32))


def test_percentile_range_matches_numpy_within_a_bin():
    x = _heavy_tailed()
    counts, edges, obs = _signed(x)
    lo, hi = percentile_range(counts, edges, 99.9)
    width = edges[1] - edges[0]
    assert abs(hi - np.percentile(x.numpy(), 99.9)) <= width
    assert abs(lo - np.percentile(x.numpy(), 0.1)) <= width


def _fq(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    s, zp = affine_params(lo, hi)
    s, zp = float(s), float(zp)
    return (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s


def test_mse_and_entropy_clip_outliers_and_mse_beats_minmax_on_samples():
    x = _heavy_tailed()
    counts, edges, _ = _signed(x)
    v = x.numpy()
    lo, hi = float(v.min()), float(v.max())
    mlo, mhi = mse_range(counts, edges)
    elo, ehi = entropy_range(counts, edges)
    assert mhi < hi and mlo > lo and ehi < hi and elo > lo  # both clip the outliers
    err = {k: float(((v - _fq(v, a, b)) ** 2).mean()) for k, (a, b) in
           {"minmax": (lo, hi), "mse": (mlo, mhi), "entropy": (elo, ehi)}.items()}
    assert err["mse"] < 0.8 * err["minmax"]
    # brute force over the same one-parameter family on the raw samples: the histogram's pick is near-optimal
    brute = min(float(((v - _fq(v, lo * a, hi * a)) ** 2).mean()) for a in np.linspace(1, 0.05, 200))
    assert err["mse"] <= 1.05 * brute


def test_affine_params_represent_zero_exactly_and_fake_quant_equals_onnx_qdq():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16) * 3 + 1
    stats = {"min": x.reshape(-1, 16).amin(0), "max": x.reshape(-1, 16).amax(0)}
    for per_channel in (False, True):
        act = calibrated_act_quant(stats, "minmax", per_channel=per_channel)
        assert float(act.fake_quant(torch.zeros(16))[0]) == 0.0
        s = act.scale.numpy().astype(np.float32)
        zp = act.zero_point.numpy().astype(np.uint8)
        axis = {"axis": -1} if per_channel else {}
        g = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **axis),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **axis)], "qdq",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor("s", TensorProto.FLOAT, s.shape, s.flatten().tolist()),
             helper.make_tensor("zp", TensorProto.UINT8, zp.shape, zp.flatten().tolist())])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        np.testing.assert_array_equal(y, act.fake_quant(x).numpy())


def test_smooth_scales_formula():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 1.0, 0.5], [0.5, 1.0, 3.0, -0.25]])
    w2 = torch.tensor([[2.0, 0.5, 1.0, 0.0]])
    s = smooth_scales(a, [w1, w2], 0.5)
    wmax = np.array([2.0, 2.0, 3.0, 0.5])
    ref = np.sqrt(a.numpy()) / np.sqrt(wmax)
    ref[2] = 1.0  # a channel never active keeps s = 1
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6)


def _calib_absmax(model, batches, sample=False):
    import re

    first = sorted({names[0] for _, _, names in fold_sites(model)})
    pattern = "^(?:" + "|".join(map(re.escape, first)) + ")$"
    st = calibrate(model, batches, [StatRequest(pattern, "minmax")] + ([StatRequest(pattern, "sample")] if sample else []))
    return lambda n: {**st.get(n, "minmax"), **(st.get(n, "sample") if sample else {})}


def test_smoothquant_folding_is_exact_on_llama(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 260, (2, 32))
    model = copy.deepcopy(tiny_llama)
    # make channel outliers so the scales are far from 1
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 20.0
    ref = copy.deepcopy(model)
    records = smoothquant_(model, _calib_absmax(model, ids), alpha=0.8)
    assert len(records) == 3 * len(model.model.layers)
    assert max(r["s_max"] for r in records) > 2
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), ref(ids).logits.numpy(), atol=2e-5, rtol=1e-5)


def _bert_batches(tok, texts):
    return [{k: v for k, v in tok([t], return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
            for t in texts]


TEXTS = ["the quick brown fox jumps over the lazy dog", "calibration text for a tiny encoder",
         "another sentence with different bytes 12345", "short one"]


def test_smoothquant_folding_is_exact_on_bert():
    loaded = load_model("tiny-bert")
    model = loaded.model.eval()
    batches = _bert_batches(loaded.tokenizer, TEXTS)
    ref = copy.deepcopy(model)
    smoothquant_(model, _calib_absmax(model, batches), alpha=0.5)
    for b in batches:
        with torch.no_grad():
            np.testing.assert_allclose(model(**b).numpy(), ref(**b).numpy(), atol=1e-6)


def _w8a8(model, batches, method="minmax", per_channel=False):
    apply_rtn(model, RTNConfig(bits=8, group_size=0, symmetric=True, embeddings=False))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    return calibrate_activations(model, batches, names, method=method, per_channel=per_channel)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_w8a8_decoder_onnx_matches_torch_fake_quant(tiny_llama, method):
    torch.manual_seed(0)
    cal = torch.randint(0, 260, (4, 32))
    model = copy.deepcopy(tiny_llama)
    smoothquant_(model, _calib_absmax(model, cal), alpha=0.5)
    records = _w8a8(model, cal, method)
    assert all(r["activation"]["method"] == method for r in records)
    # q/k/v share one input: equal parameters, so the fused export keeps them
    layer = model.model.layers[0].self_attn
    assert torch.equal(layer.q_proj.act.scale, layer.v_proj.act.scale)
    proto, _ = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 * len(model.model.layers)  # qkv, o, gate_up, down
    assert_decoder_matches_torch(proto, model)


def assert_decoder_matches_torch(proto, model) -> None:
    """The tiny W8A8 decoder graph on ORT gives the torch fake-quant model's logits on 20 random tokens."""
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 260, (1, 20))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    for i in range(len(model.model.layers)):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, 2, 0, 16), np.float32)
    got = sess.run(["logits"], feeds)[0][0]
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    # ORT computes the integer matmul exactly; the only difference from torch's float fake-quant
    # is float summation order, which can move a value across a rounding boundary downstream
    np.testing.assert_allclose(got, want, atol=5e-3)
    assert np.mean(np.abs(got - want) < 1e-4) > 0.99


@pytest.mark.parametrize("quant", [None, "w8a8"])
def test_encoder_onnx_matches_torch_with_padding(quant, tmp_path):
    loaded = load_model("tiny-bert")
    model = loaded.model.eval()
    if quant:
        smoothquant_(model, _calib_absmax(model, _bert_batches(loaded.tokenizer, TEXTS)), alpha=0.5)
        _w8a8(model, _bert_batches(loaded.tokenizer, TEXTS))
    proto, formats = build_bert_encoder(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"]).numpy()
    got = sess.run(["sentence_embedding"], {"input_ids": enc["input_ids"].numpy(),
                                            "attention_mask": enc["attention_mask"].numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5 if quant is None else 2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    ops = {n.op_type for n in proto.graph.node}
    assert ("QuantizeLinear" in ops) == (quant is not None)
    if quant:
        assert sum(n.op_type == "Mul" and "residual_scale" in n.name for n in proto.graph.node) == 2 * 2
        opt = ort.SessionOptions()
        opt.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), opt, providers=["CPUExecutionProvider"])
        import onnx

        fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert fused.count("MatMulIntegerToFloat") == 4 * 2  # every projection runs as an integer matmul
    assert len(formats) == 1 + 4 * model.config.num_hidden_layers  # embedding + qkv, o, ffn in, ffn out


def test_smoothquant_refuses_quantized_linears_and_unknown_models(tiny_llama):
    from edgecompress.errors import EdgeCompressError

    model = copy.deepcopy(tiny_llama)
    apply_rtn(model, RTNConfig(bits=8, group_size=0))
    with pytest.raises(EdgeCompressError, match="before the quantize step"):
        smoothquant_(model, lambda n: {"absmax": torch.ones(64)}, 0.5)
    with pytest.raises(EdgeCompressError, match="supported model types"):
        list(fold_sites(torch.nn.Linear(2, 2)))


def test_search_alpha_picks_the_grid_point_with_the_least_output_error():
    from edgecompress.compress.quant.activation import ActQuant, affine_params
    from edgecompress.compress.quant.awq import fake_quant
    from edgecompress.compress.quant.formats import QuantScheme
    from edgecompress.compress.quant.smoothquant import search_alpha

    torch.manual_seed(0)
    X = torch.randn(256, 32)
    X[:, 5] *= 60  # an outlier channel: some smoothing must help
    W = torch.randn(16, 32)
    best, errors = search_alpha(X, X.amin(0), X.amax(0), [W], grid=11)
    assert best == min(errors, key=errors.get) and errors[best] < errors[0.0]
    # the reported error at alpha = 0.5, recomputed here: s = sqrt(max|X_j| / max|W_:,j|)
    s = (X.abs().amax(0) / W.abs().amax(0)).sqrt()
    scale, zp = affine_params((X / s).min(), (X / s).max())
    plain = ActQuant(scale, zp).fake_quant(X / s) @ fake_quant(W * s, QuantScheme(8, 0, True)).T
    assert errors[0.5] == pytest.approx(float((plain - X @ W.T).square().sum()), rel=1e-4)


def test_auto_alpha_folding_stays_exact(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 260, (2, 32))
    model = copy.deepcopy(tiny_llama)
    ref = copy.deepcopy(model)
    records = smoothquant_(model, _calib_absmax(model, ids, sample=True), alpha="auto", grid=5)
    assert {r["alpha"] for r in records} <= {0.0, 0.25, 0.5, 0.75, 1.0}
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), ref(ids).logits.numpy(), atol=2e-5, rtol=1e-5)
