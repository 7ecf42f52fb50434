"""ONNX emission: every format equals its torch reference; the KV-cache decoder equals the full forward."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecompress.compress.quant.formats import QuantScheme, quantize_blockwise, split_rows
from edgecompress.compress.quant.modules import QuantEmbedding, QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.export.graph import FLOAT, INT64, GraphBuilder
from edgecompress.export.onnx_formats import EmitOptions, WeightCache, emit_embedding, emit_linear
from edgecompress.export.onnx_llm import build_llama_decoder


def _options(level: int = 0) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT rewrites DequantizeLinear+MatMul into MatMulNBits at this accuracy level (default 4)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return so


def _session(g: GraphBuilder, level: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(g.model().SerializeToString(), _options(level), providers=["CPUExecutionProvider"])


def _linear_graph(mod: nn.Module, k: int, level: int = 0):
    g = GraphBuilder("t")
    x = g.input("x", FLOAT, ["m", k])
    y, fmt = emit_linear(g, x, mod, "layer", EmitOptions(accuracy_level=level), WeightCache())
    g.node("Identity", [y], outputs=["y"])
    g.output("y", FLOAT, None)
    return _session(g, level), fmt


@pytest.mark.parametrize("n,k,block", [(40, 72, 32), (96, 576, 128), (17, 576, 64), (8, 1536, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_equals_torch_dequantized_matmul(n, k, block, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True)
    p = quantize_blockwise(lin.weight, QuantScheme(4, block, symmetric))
    sess, fmt = _linear_graph(QuantLinear(p, lin.bias), k)
    x = torch.randn(5, k)
    ref = (x @ p.to_float().T + lin.bias).detach().numpy()
    (y,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert fmt.onnx_op == "MatMulNBits"
    # accuracy_level 4 quantizes activations to int8: close, not equal
    sess4, _ = _linear_graph(QuantLinear(p, lin.bias), k, level=4)
    (y4,) = sess4.run(None, {"x": x.numpy()})
    assert np.abs(y4 - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("block,op", [(0, "DequantizeLinear+MatMul"), (64, "MatMulNBits")])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_equals_torch(block, op, symmetric):
    """int8 per channel is QDQ; int8 in power-of-two blocks is MatMulNBits(bits=8)."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 48, bias=False)
    p = quantize_blockwise(lin.weight, QuantScheme(8, block, symmetric))
    sess, fmt = _linear_graph(QuantLinear(p), 576)
    assert fmt.onnx_op == op
    x = torch.randn(3, 576)
    (y,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, (x @ p.to_float().T).numpy(), rtol=1e-4, atol=1e-4)
    sess4, _ = _linear_graph(QuantLinear(p), 576, level=4)  # int8 activations: close, not equal
    (y4,) = sess4.run(None, {"x": x.numpy()})
    assert np.abs(y4 - y).max() < 0.05 * np.abs(y).max()


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 128, False), (8, 64, True), (8, 0, True),
                                                   (8, 0, False)])
def test_gather_block_quantized_equals_to_float_rows(bits, block, symmetric):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 72)
    p = quantize_blockwise(emb.weight, QuantScheme(bits, block, symmetric))
    g = GraphBuilder("t")
    ids = g.input("ids", INT64, [1, "s"])
    out, fmt = emit_embedding(g, ids, QuantEmbedding(p), "emb", EmitOptions(), WeightCache())
    g.node("Identity", [out], outputs=["e"])
    g.output("e", FLOAT, None)
    idx = np.array([[0, 7, 49, 7]])
    (e,) = _session(g).run(None, {"ids": idx})
    np.testing.assert_array_equal(e[0], p.to_float()[idx[0]].numpy())
    # a whole 72-wide row is no power-of-two block: int8 rows are gathered and scaled in standard ops
    assert fmt.onnx_op == ("Gather+Mul" if block == 0 else "GatherBlockQuantized")


def _run(sess, ids, past=None, n_layers=2, kv=2, hd=16):
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, ids.shape[1] + (past[0].shape[2] if past else 0)), np.int64)}
    for i in range(n_layers):
        for j, k in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{k}"] = past[2 * i + j] if past else np.zeros((1, kv, 0, hd), np.float32)
    out = sess.run(None, feeds)
    return out[0], out[1:]


SPLIT_ROWS = (3, 17, 18, 100, 259)  # int8 rows of the split tied embedding/head, the last row included


def _split_tied_rows(model: nn.Module, sym: bool = True) -> None:
    """int4 decoder; the tied embedding/head int8 at SPLIT_ROWS, int4 elsewhere (one SplitRowsTensor)."""
    apply_rtn(model, RTNConfig(bits=4, group_size=32, symmetric=sym, embeddings=False))
    w = model.model.embed_tokens.weight.data
    p = split_rows(w, torch.tensor(SPLIT_ROWS),
                   lambda rows, hi: quantize_blockwise(rows, QuantScheme(8 if hi else 4, 32, sym)))
    model.model.embed_tokens = QuantEmbedding(p)
    model.lm_head = QuantLinear(p)


@pytest.mark.parametrize("quant", [None, (4, 32, True), (4, 32, False), (8, 0, True), (8, 16, False), "split",
                                   "split-asym"])
@pytest.mark.parametrize("fuse", [True, False])
def test_decoder_matches_torch_and_kv_cache_matches_full_forward(tiny_llama, quant, fuse):
    model = copy.deepcopy(tiny_llama)
    if isinstance(quant, str):
        _split_tied_rows(model, sym=quant == "split")
    elif quant:
        bits, block, sym = quant
        apply_rtn(model, RTNConfig(bits=bits, group_size=block, symmetric=sym))
    proto, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0), fuse=fuse)
    sess = ort.InferenceSession(proto.SerializeToString(), _options(0), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    ids = torch.randint(0, 260, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    full, _ = _run(sess, ids.numpy())
    np.testing.assert_allclose(full[0], ref, atol=2e-4)
    # prefix of 10, then one token at a time through the cache
    logits, past = _run(sess, ids[:, :10].numpy())
    steps = [logits[0]]
    for t in range(10, 24):
        logits, past = _run(sess, ids[:, t:t + 1].numpy(), past)
        steps.append(logits[0])
    np.testing.assert_allclose(np.concatenate(steps), full[0], atol=1e-5)
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupQueryAttention" in ops
    if quant and quant[0] in (4, "s"):
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
        assert "MatMul" not in ops  # no fp32 weight matmul is left
    n_proj = len([f for f in formats if f.module != "model.embed_tokens"])
    assert n_proj == (2 * (4 if fuse else 7) + 1)


def test_logits_to_keep_returns_last_positions(tiny_llama):
    proto, _ = build_llama_decoder(tiny_llama, opts=EmitOptions(accuracy_level=0))
    sess = ort.InferenceSession(proto.SerializeToString(), _options(0), providers=["CPUExecutionProvider"])
    ids = np.arange(3, 15, dtype=np.int64)[None]
    full, _ = _run(sess, ids)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.array([1])}
    for i in range(2):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, 2, 0, 16), np.float32)
    last = sess.run(["logits"], feeds)[0]
    assert last.shape == (1, 1, 260)
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="llama-family"):
        build_llama_decoder(model)


@pytest.mark.parametrize("quant", [(4, 32, True), (4, 32, False), (8, 16, False), (8, 0, True), (8, 0, False), (3, 16, True),
                                   "split"])
def test_torch_runtime_decodes_every_format_back_to_the_model_weights(tmp_path, quant):
    """The torch runtime reads the artifact's packed initializers back into exactly the quantized weights."""
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes.torch_ref import load_torch_model

    lm = load_model("tiny-llama")
    if quant == "split":
        _split_tied_rows(lm.model)
    else:
        bits, block, sym = quant
        apply_rtn(lm.model, RTNConfig(bits=bits, group_size=block, symmetric=sym, embeddings=bits != 3))
    body = export_causal_lm(lm.model, tmp_path, accuracy_level=0)
    if quant == "split":  # one copy of each table and of the positions, every stored byte counted
        v, h = lm.model.model.embed_tokens.packed.shape
        emb = next(f for f in body["layers"] if f["module"] == "model.embed_tokens")
        assert emb["stored_bytes"] == lm.model.model.embed_tokens.packed.storage_bits() // 8
        assert next(f for f in body["layers"] if f["module"] == "lm_head")["stored_bytes"] == 0
    lm.save_hf_files(tmp_path)
    write_manifest(tmp_path, {"task": "causal-lm", **body})
    decoded = load_torch_model(Artifact.load(tmp_path))
    expected = {n: m.dense_weight() for n, m in lm.model.named_modules() if hasattr(m, "dense_weight")}
    got = decoded.state_dict()  # tied head included
    for name, w in expected.items():
        torch.testing.assert_close(got[f"{name}.weight"], w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,k,block", [(40, 72, 8), (96, 576, 128), (17, 576, 64)])
def test_int3_custom_op_function_body_equals_torch(n, k, block):
    """3-bit weights: a custom-domain op whose model-local function body ONNX Runtime runs."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    p = quantize_blockwise(lin.weight, QuantScheme(3, block, True))
    sess, fmt = _linear_graph(QuantLinear(p), k)
    assert fmt.onnx_op == "edgecompress::MatMulBlockQuantized"
    assert fmt.bits == pytest.approx(8 * (p.qweight.numel() + 2 * p.scales.numel()) / (n * k))  # fp16 scales
    assert p.qweight.shape == (n, p.n_blocks, 3 * block // 8)
    x = torch.randn(5, k)
    (y,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, (x @ p.to_float().T).numpy(), rtol=1e-4, atol=1e-4)


def test_int3_decoder_and_3bit_embeddings_are_refused(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    apply_rtn(model, RTNConfig(bits=3, group_size=16, embeddings=False))
    proto, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0))
    assert any(f.domain == "edgecompress" for f in proto.functions)
    assert {f.format for f in formats if f.module not in ("model.embed_tokens", "lm_head")} == {"int3-b16-sym"}
    sess = ort.InferenceSession(proto.SerializeToString(), _options(0), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 260, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    full, _ = _run(sess, ids.numpy())
    np.testing.assert_allclose(full[0], ref, atol=2e-4)
    emb3 = copy.deepcopy(tiny_llama)
    apply_rtn(emb3, RTNConfig(bits=3, group_size=16))
    with pytest.raises(NotImplementedError, match="3-bit embeddings"):
        build_llama_decoder(emb3)


def test_weight_cache_never_confuses_a_new_tensor_with_a_freed_one():
    """Fused projections are temporaries: a freed one's id is reused by the next, and a cache keyed
    by id alone handed layer 7 the fused QKV weights of layer 6 (SmolLM2 int4: perplexity 21.3
    instead of 17.2). The cache keeps what it has seen alive, so a new tensor is never a hit."""
    import torch

    from edgecompress.export.onnx_formats import WeightCache

    cache = WeightCache()
    for i in range(200):
        t = torch.zeros(4)  # freed at the next iteration unless the cache holds it
        assert cache.get(t) is None
        cache.put(t, {"B": f"w{i}"}, f"layer{i}")
