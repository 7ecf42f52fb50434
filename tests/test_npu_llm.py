"""NPU form of a causal LM (export/npu_llm.py, runtimes/static_lm.py): the static float prefill/decode graphs
against the Hugging Face model, the QDQ artifact on the HTP simulator (CPU fallback disabled) and on ort-cpu,
and the static-shape errors. tiny-llama only: the simulator is slow."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgecompress.cli import main
from edgecompress.errors import EdgeCompressError
from edgecompress.export.npu import NpuExportError, prepare_for_npu, unsupported_nodes
from edgecompress.export.npu_llm import llm_static_dims, static_llm_onnx
from edgecompress.models import load_model
from edgecompress.runtimes.qnn_htp import qnn_version

needs_qnn = pytest.mark.skipif(qnn_version() is None, reason="onnxruntime-qnn is not installed")
P, C = 16, 32


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama").model


def _eps_free(model):
    """The model with every RMSNorm's eps at 0: the static graphs' LpNormalization form is then exact."""
    import copy

    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.0
    return m


def _float_sessions(model):
    shapes = {"batch_size": 1, "prefill_len": P, "max_context": C}
    out = []
    for mode in ("prefill", "decode"):
        g, rewrites = prepare_for_npu(static_llm_onnx(model, mode, prefill_len=P, max_context=C), shapes)
        assert rewrites["mask_sentinels_clamped"], "the float32.min mask constant must be clamped"
        assert unsupported_nodes(g) == []
        out.append(ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]))
    return out


def test_float_static_graphs_equal_the_torch_model(tiny):
    """Prefill of a right-padded prompt (garbage in the padding), then decode steps over the fixed cache, give
    the torch model's logits at every position."""
    pre, dec = _float_sessions(tiny)
    ref_model = _eps_free(tiny)
    rng = np.random.default_rng(0)
    vocab, layers = tiny.config.vocab_size, tiny.config.num_hidden_layers
    ids = rng.integers(0, vocab, 24)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    n = 10
    feeds = {"input_ids": np.concatenate([ids[:n], rng.integers(0, vocab, P - n)])[None],
             "position_ids": np.arange(P)[None], "attention_mask": (np.arange(P) < n).astype(np.int64)[None]}
    out = pre.run(None, feeds)
    np.testing.assert_allclose(out[0][0, :n], ref[:n], atol=2e-5, rtol=0)
    kv_heads, head_dim = out[1].shape[1], out[1].shape[3]
    cache = np.zeros((layers, 2, kv_heads, C, head_dim), np.float32)
    for j, x in enumerate(out[1:]):
        cache[j // 2, j % 2, :, :P] = x[0]  # the padding rows too: the decode mask must hide them
    for pos in range(n, len(ids)):
        f = {"input_ids": ids[pos:pos + 1][None], "position_ids": np.array([[pos]]),
             "attention_mask": (np.arange(C) < pos).astype(np.int64)[None]}
        for i in range(layers):
            f[f"past_key.{i}"], f[f"past_value.{i}"] = cache[i, 0][None], cache[i, 1][None]
        o = dec.run(None, f)
        for j, x in enumerate(o[1:]):
            cache[j // 2, j % 2, :, pos] = x[0, :, 0]
        np.testing.assert_allclose(o[0][0, 0], ref[pos], atol=2e-5, rtol=0, err_msg=f"decode position {pos}")


def test_decode_mask_hides_the_padding(tiny):
    """Must-fail counterpart: attending to the padded prefill rows (mask all ones) changes the logits."""
    pre, dec = _float_sessions(tiny)
    rng = np.random.default_rng(1)
    n, layers = 6, tiny.config.num_hidden_layers
    ids = rng.integers(0, tiny.config.vocab_size, P)
    out = pre.run(None, {"input_ids": ids[None], "position_ids": np.arange(P)[None],
                         "attention_mask": (np.arange(P) < n).astype(np.int64)[None]})
    f = {"input_ids": ids[n:n + 1][None], "position_ids": np.array([[n]])}
    for i in range(layers):
        for kind, x in (("key", out[1 + 2 * i]), ("value", out[2 + 2 * i])):
            f[f"past_{kind}.{i}"] = np.pad(x, ((0, 0), (0, 0), (0, C - P), (0, 0)))
    good = dec.run(None, {**f, "attention_mask": (np.arange(C) < n).astype(np.int64)[None]})[0]
    bad = dec.run(None, {**f, "attention_mask": (np.arange(C) < P).astype(np.int64)[None]})[0]
    assert np.abs(good - bad).max() > 1e-3


def test_missing_static_dims_are_named():
    with pytest.raises(NpuExportError, match="max_context"):
        llm_static_dims({"batch_size": 1, "prefill_len": 16})
    with pytest.raises(NpuExportError, match="prefill_len, max_context"):
        llm_static_dims({"batch_size": 1, "sequence_length": 64})
    with pytest.raises(NpuExportError, match="prefill_len <= max_context"):
        llm_static_dims({"prefill_len": 64, "max_context": 32})


def test_recipe_names_the_missing_llm_dimension(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {source: tiny-llama}\ncalibration: {data: pydoc:calib, samples: 2, seq_len: 16}\n"
                      "export:\n  - {format: onnx, target: npu-qnn, static_shapes: {batch_size: 1, prefill_len: 16}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "missing dimension(s): max_context" in capsys.readouterr().err


def test_encoder_shapes_on_a_causal_lm_name_the_llm_dims(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {source: tiny-llama}\ncalibration: {data: pydoc:calib, samples: 2, seq_len: 16}\n"
                      "export:\n  - {format: onnx, target: npu-qnn, static_shapes: {batch_size: 1, sequence_length: 16}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "prefill_len, max_context has no value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the QDQ artifact on the HTP

@pytest.fixture(scope="module")
def npu_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("npu_llm")
    recipe = d / "r.yaml"
    recipe.write_text(f"name: tiny-npu\nmodel: {{source: tiny-llama}}\n"
                      f"calibration: {{data: pydoc:calib, samples: 4, seq_len: {C}}}\n"
                      f"export:\n  - {{format: onnx, name: npu, target: npu-qnn, "
                      f"static_shapes: {{batch_size: 1, prefill_len: {P}, max_context: {C}}}}}\n")
    assert main(["run", str(recipe), "-o", str(d / "out")]) == 0
    return d / "out" / "tiny-npu" / "npu"


@needs_qnn
def test_qdq_artifact_runs_fully_on_the_htp(npu_artifact, tiny):
    from edgecompress.artifact import Artifact
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(npu_artifact)
    npu = art.manifest["npu"]
    assert npu["weight_rounding"]["method"] == "gptq"  # the export checked the QDQ graphs hold its codes
    for mode in ("prefill", "decode"):
        assert npu["graphs"][mode]["placement"] == {"QNNExecutionProvider": 1}, mode  # 0 CPU nodes
        ops = npu["graphs"][mode]["op_counts"]
        assert not [o for o in ops if "::" in o], ops  # no contrib ops
        assert ops["QuantizeLinear"] > 0
    # attention's Q.K^T and P.V in float16 (2 per layer), the projections quantized
    import onnx

    assert len(npu["rewrites"]["fp16_matmuls"]) == 2 * tiny.config.num_hidden_layers
    for body in (art.path / "prefill.onnx", art.path / "decode.onnx"):
        g = onnx.load(str(body))
        half = [n.name for n in g.graph.node if n.op_type == "MatMul"
                and all(i.endswith(tuple(f"_fp16_in{j}" for j in (0, 1))) for i in n.input)]
        assert len(half) == 2 * tiny.config.num_hidden_layers, half
    htp = open_runtime("qnn-htp", art)
    assert htp.compiled_from == {"prefill.onnx": "context", "decode.onnx": "context"}
    cpu = open_runtime("ort-cpu", art)

    from edgecompress.data import load_text, token_windows

    ids = token_windows(art.tokenizer(), load_text("pydoc:eval"), P + 4, 1, seed=0)[0].numpy()  # 4 via decode
    with torch.no_grad():
        ref = tiny(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    got = htp.logits(ids)

    def rel_rms(a, b):
        return float(np.sqrt(((a - b) ** 2).mean()) / b.std())

    assert rel_rms(got, ref) < 0.05  # measured ~0.02 (W8A16)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert rel_rms(cpu.logits(ids), got) < 0.03  # same artifact on the CPU EP; measured ~0.01

    prompt = [int(t) for t in ids[:8]]
    forced = cpu.forced_decode(prompt, [int(t) for t in ids[8:12]])  # the decode graph, teacher-forced
    assert forced.shape == (5, ref.shape[1]) and rel_rms(forced, ref[7:12]) < 0.05
    gen = htp.generate(prompt, 6)
    with torch.no_grad():
        want = tiny.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 8:].tolist()
    assert gen.tokens == want
    assert cpu.generate(prompt, 6).tokens == gen.tokens


@needs_qnn
def test_static_runtime_refuses_what_does_not_fit(npu_artifact):
    from edgecompress.artifact import Artifact
    from edgecompress.runtimes import open_runtime

    rt = open_runtime("ort-cpu", Artifact.load(npu_artifact))
    with pytest.raises(EdgeCompressError, match="max_context"):
        rt.generate(list(range(20)), C)
    with pytest.raises(EdgeCompressError, match="does not run causal-lm/static"):
        open_runtime("torch", Artifact.load(npu_artifact))


@needs_qnn
def test_bench_reports_htp_placement(npu_artifact, capsys):
    assert main(["bench", str(npu_artifact), "--runtime", "qnn-htp", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placement"] == {"prefill": {"QNNExecutionProvider": 1}, "decode": {"QNNExecutionProvider": 1}}
    assert out["decode_tok_s"] > 0


@pytest.mark.parametrize("wide_range", [None, 1000.0, 500.0])
def test_fp16_rewrite_takes_activation_matmuls_and_wide_inputs(wide_range):
    """fp16_matmuls: a MatMul of two dequantized activations is cast to float16 (must match); a MatMul
    with a dequantized weight is too when its activation's calibrated range (here 0.01 x 65535 = 655) is
    wider than ``wide_range``, and not otherwise; a raw float weight never (must not match); ORT agrees
    before and after within float16 rounding."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export.npu import fp16_matmuls

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(np.float32(0.01), "s"), numpy_helper.from_array(np.uint16(32768), "z"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.round(w * 20).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.05), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
             helper.make_node("MatMul", ["ad", "bd"], ["act"], name="act_x_act"),
             helper.make_node("MatMul", ["ad", "W"], ["raw"], name="raw_weight"),
             helper.make_node("MatMul", ["ad", "Wd"], ["qw"], name="dq_weight")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 8])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("a"), vi("b")], [vi("act"), vi("raw"), vi("qw")],
                                                inits), opset_imports=[helper.make_opsetid("", 21)])
    feeds = {"a": rng.standard_normal((8, 8)).astype(np.float32), "b": rng.standard_normal((8, 8)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    done = fp16_matmuls(model, wide_range=wide_range)
    wide = wide_range is not None and wide_range < 655
    assert done == ["act_x_act"] + (["dq_weight"] if wide else [])
    onnx.checker.check_model(model)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    h, f = TensorProto.FLOAT16, TensorProto.FLOAT
    assert [c.attribute[0].i for c in casts] == [h, h, f] + ([h, f] if wide else [])
    # a wide weight MatMul reads its int8 grid's values as a float16 constant; its DequantizeLinear is gone
    assert ("Wq" in {i.name for i in model.graph.initializer}) is not wide
    from edgecompress.export.npu import qdq_weight_summary

    assert qdq_weight_summary(model)["params_by_format"] == ({"float16": 64} if wide else {"int8": 64})
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=2e-3 * np.abs(before[0]).max())  # fp16 inputs
    np.testing.assert_array_equal(after[1], before[1])
    if wide:  # against the exact product of the dequantized inputs (the CPU EP's fused int path is not exact)
        deq = (np.clip(np.round(feeds["a"] / 0.01) + 32768, 0, 65535) - 32768) * 0.01
        exact = deq @ (np.round(w * 20).astype(np.int8).astype(np.float32) * 0.05)
        np.testing.assert_allclose(after[2], exact, rtol=0, atol=2e-3 * np.abs(exact).max())  # fp16 inputs
    else:
        np.testing.assert_array_equal(after[2], before[2])


# ----------------------------------------------------------------------------- GPTQ int8 weight rounding

def test_gptq_rounding_is_on_the_grid_and_beats_nearest_on_held_out_text(tiny):
    """round_linears: every weight MatMul of the static graphs on its int8 per-channel grid (scale max|W_c|/127,
    |code| <= 127); the model with those weights is closer to the float model on held-out text than with the
    nearest codes (the oracle: the torch model itself, not the Hessian error the function reports)."""
    import copy

    from edgecompress.compress.quant.conv_rounding import channel_scales, round_nearest
    from edgecompress.data import load_text, token_windows
    from edgecompress.export.npu_llm import _linears, round_linears

    tok = load_model("tiny-llama").tokenizer
    calib = token_windows(tok, load_text("pydoc:calib"), C, 8, seed=0).numpy()
    rounded, record = round_linears(tiny, calib)
    assert set(rounded) == {name for name, _, _ in _linears(tiny)} and "lm_head" in rounded
    for name, (w, s) in rounded.items():
        q = w.double() / s.double()[:, None]
        assert (q - q.round()).abs().max() < 1e-4 and q.abs().max() <= 127 + 1e-4, name
        w0 = tiny.get_submodule(name).weight
        live = w0.abs().amax(1) > 0
        torch.testing.assert_close(s[live], w0.abs().amax(1)[live] / 127)
        assert (s[~live] == s[live].median()).all()  # a dead row (the tied head's padding): a normal scale
    assert record["mean_rel_output_error"] < record["mean_rel_output_error_nearest"]

    held = token_windows(tok, load_text("pydoc:eval"), 48, 2, seed=0)
    errors = {}
    with torch.no_grad():
        ref = [tiny(input_ids=row[None]).logits for row in held]
        for kind in ("nearest", "gptq"):
            m = copy.deepcopy(tiny)
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())  # the embedding stays float
            for name, mod, _ in _linears(m):
                w = mod.weight.data
                mod.weight.data = rounded[name].weight.clone() if kind == "gptq" else round_nearest(w, channel_scales(w))
            errors[kind] = sum(float((m(input_ids=row[None]).logits - r).pow(2).mean()) for row, r in zip(held, ref))
    assert errors["gptq"] < errors["nearest"], errors


def test_grid_scales_find_every_rounded_weight_or_name_the_missing(tiny):
    """grid_scales maps the traced graph's (transposed, renamed) MatMul constants back to the rounded weights,
    the query projection with its folded 1/sqrt(head_dim); a weight the graph does not hold is named."""
    from edgecompress.export.npu_llm import Rounded, grid_scales, round_linears

    calib = np.random.default_rng(0).integers(0, tiny.config.vocab_size, (4, C))
    rounded, _ = round_linears(tiny, calib)
    for mode in ("prefill", "decode"):
        proto = static_llm_onnx(tiny, mode, prefill_len=P, max_context=C, rounded=rounded)
        scales = grid_scales(proto, tiny, rounded)
        assert len(scales) == len(rounded)
        q_name = "model.layers.0.self_attn.q_proj"
        head_dim = tiny.config.hidden_size // tiny.config.num_attention_heads
        assert any(np.allclose(s, rounded[q_name].scale.numpy() / np.sqrt(head_dim)) for s in scales.values())
    bad = dict(rounded)
    w, s = bad["lm_head"]
    bad["lm_head"] = Rounded(w + s[:, None], s)  # one code up: no longer what the graph was traced with
    with pytest.raises(NpuExportError, match="lm_head"):
        grid_scales(proto, tiny, bad)


def test_rounding_refuses_what_the_static_graphs_cannot_hold(tiny):
    """round_linears names a compressed (here: biased) linear or a pruned layer before its calibration pass."""
    import copy

    from edgecompress.export.npu_llm import round_linears

    calib = np.zeros((1, 8), np.int64)
    m = copy.deepcopy(tiny)
    m.model.layers[1].mlp.down_proj = torch.nn.Linear(m.config.intermediate_size, m.config.hidden_size)
    with pytest.raises(NpuExportError, match=r"model.layers.1.mlp.down_proj is a Linear with bias"):
        round_linears(m, calib)
    del m.model.layers[1].mlp
    with pytest.raises(NpuExportError, match="every decoder layer whole"):
        round_linears(m, calib)
