"""NPU target: the graph passes (must-match / must-not-match, ORT before == after), the npu-qnn export of
sentence encoders and the qnn-htp runtime (HTP simulator, CPU fallback disabled)."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgecompress.export.npu import (
    NpuExportError,
    clamp_mask_sentinels,
    fixed_ranges,
    fold_batchnorm,
    fuse_l2_normalize,
    make_static,
    unsupported_nodes,
)
from edgecompress.runtimes.qnn_htp import qnn_version
from onnx import TensorProto, helper, numpy_helper

from edgecompress.cli import main

needs_qnn = pytest.mark.skipif(qnn_version() is None, reason="onnxruntime-qnn is not installed")


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _run(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _masked_softmax(sentinel):
    """softmax(scores + (1 - mask) * sentinel) with a scalar sentinel initializer."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Sub", ["one", "mask"], ["inv"]), helper.make_node("Mul", ["inv", "fill"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(sentinel, np.float32), "fill")]
    return _model(nodes, [helper.make_tensor_value_info("scores", f, [2, 6]),
                          helper.make_tensor_value_info("mask", f, [2, 6])],
                  [helper.make_tensor_value_info("probs", f, [2, 6])], inits)


def test_mask_sentinel_clamp_keeps_the_softmax():
    rng = np.random.default_rng(0)
    feeds = {"scores": rng.normal(0, 4, (2, 6)).astype(np.float32),
             "mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32)}
    m = _masked_softmax(np.finfo(np.float32).min)
    before = _run(m, feeds)
    assert clamp_mask_sentinels(m) == ["fill"]
    assert float(numpy_helper.to_array(m.graph.initializer[1])) == -100.0
    np.testing.assert_allclose(_run(m, feeds), before, atol=1e-7)
    assert before[:, 4:].max() == 0.0  # masked positions really are masked


@pytest.mark.parametrize("value", [-5.0, 0.0, 3e38])
def test_mask_sentinel_clamp_leaves_ordinary_scalars(value):
    m = _masked_softmax(value)
    assert clamp_mask_sentinels(m) == []
    assert numpy_helper.to_array(m.graph.initializer[1]) == np.float32(value)


def test_mask_sentinel_clamp_leaves_weight_tensors():
    w = np.full((2, 2), -1e9, np.float32)  # a tensor, not a broadcast sentinel
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(w, "w")])
    assert clamp_mask_sentinels(m) == []


def _l2norm(axes=(-1,), eps=1e-12, extra_use=False):
    f = TensorProto.FLOAT
    nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["norm"], keepdims=1),
             helper.make_node("Max", ["norm", "eps"], ["clamped"]),
             helper.make_node("Div", ["x", "clamped"], ["y"], name="l2/normalize")]
    outs = [helper.make_tensor_value_info("y", f, [3, 5])]
    if extra_use:
        nodes.append(helper.make_node("Identity", ["norm"], ["norm_out"]))
        outs.append(helper.make_tensor_value_info("norm_out", f, [3, 1]))
    inits = [numpy_helper.from_array(np.array(list(axes), np.int64), "axes"),
             numpy_helper.from_array(np.array(eps, np.float32), "eps")]
    return _model(nodes, [helper.make_tensor_value_info("x", f, [3, 5])], outs, inits)


@pytest.mark.parametrize("axes", [(-1,), (1,)])
def test_l2_normalize_fuses_into_lpnormalization(axes):
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    m = _l2norm(axes)
    before = _run(m, {"x": x})
    assert fuse_l2_normalize(m) == ["l2/normalize"]
    assert [n.op_type for n in m.graph.node] == ["LpNormalization"]
    np.testing.assert_allclose(_run(m, {"x": x}), before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{"axes": (0,)}, {"eps": 0.5}, {"extra_use": True}])
def test_l2_normalize_leaves_other_patterns(kw):
    m = _l2norm(**kw)
    ops = [n.op_type for n in m.graph.node]
    assert fuse_l2_normalize(m) == []
    assert [n.op_type for n in m.graph.node] == ops


def _conv_bn(with_bias=True, between=None, extra_use=False):
    rng = np.random.default_rng(2)
    f = TensorProto.FLOAT
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1])]
    src = "c"
    if between:
        nodes.append(helper.make_node(between, ["c"], ["r"]))
        src = "r"
    nodes.append(helper.make_node("BatchNormalization", [src, "g", "beta", "mu", "var"], ["y"], name="bn",
                                  epsilon=1e-3))
    outs = [helper.make_tensor_value_info("y", f, [1, 4, 5, 5])]
    if extra_use:
        outs.append(helper.make_tensor_value_info("c", f, [1, 4, 5, 5]))
    arr = {"w": rng.normal(size=(4, 3, 3, 3)), "b": rng.normal(size=4), "g": rng.uniform(0.5, 2, 4),
           "beta": rng.normal(size=4), "mu": rng.normal(size=4), "var": rng.uniform(0.1, 2, 4)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arr.items() if with_bias or k != "b"]
    return _model(nodes, [helper.make_tensor_value_info("x", f, [1, 3, 5, 5])], outs, inits)


@pytest.mark.parametrize("with_bias", [True, False])
def test_batchnorm_folds_into_conv(with_bias):
    x = np.random.default_rng(3).normal(size=(1, 3, 5, 5)).astype(np.float32)
    m = _conv_bn(with_bias)
    before = _run(m, {"x": x})
    assert fold_batchnorm(m) == ["bn"]
    assert [n.op_type for n in m.graph.node] == ["Conv"]
    onnx.checker.check_model(m)
    np.testing.assert_allclose(_run(m, {"x": x}), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"between": "Relu"}, {"extra_use": True}])
def test_batchnorm_fold_leaves_other_patterns(kw):
    m = _conv_bn(**kw)
    ops = [n.op_type for n in m.graph.node]
    assert fold_batchnorm(m) == []
    assert [n.op_type for n in m.graph.node] == ops


def test_fixed_ranges_of_bounded_functions():
    f = TensorProto.FLOAT
    m = _model([helper.make_node("Softmax", ["x"], ["s"]), helper.make_node("Sigmoid", ["x"], ["g"]),
                helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Clip", ["x", "lo", "hi"], ["r6"]),
                helper.make_node("Clip", ["x", "lo", ""], ["r0"]), helper.make_node("Relu", ["x"], ["r"])],
               [helper.make_tensor_value_info("x", f, [2, 3])],
               [helper.make_tensor_value_info(n, f, [2, 3]) for n in ("s", "g", "t", "r6", "r0", "r")],
               [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    assert fixed_ranges(m) == {"s": (0.0, 1.0), "g": (0.0, 1.0), "t": (-1.0, 1.0), "r6": (0.0, 6.0)}


def test_make_static_sets_dims_and_names_a_missing_one():
    f = TensorProto.FLOAT
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", f, ["batch", "seq"])],
               [helper.make_tensor_value_info("y", f, ["batch", "seq"])])
    s = make_static(m, {"batch": 1, "seq": 64})
    assert [d.dim_value for d in s.graph.input[0].type.tensor_type.shape.dim] == [1, 64]
    assert [d.dim_value for d in s.graph.output[0].type.tensor_type.shape.dim] == [1, 64]
    with pytest.raises(NpuExportError, match="'seq'"):
        make_static(m, {"batch": 1})


def test_unsupported_nodes_name_node_and_op():
    f = TensorProto.FLOAT
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="ok"),
         helper.make_node("NonZero", ["a"], ["b"], name="nz"),
         helper.make_node("MatMulNBits", ["a"], ["c"], name="q4", domain="com.microsoft")],
        "t", [helper.make_tensor_value_info("x", f, [2])], []))
    assert unsupported_nodes(m) == [("nz", "NonZero"), ("q4", "com.microsoft::MatMulNBits")]


BERT_NPU = """\
name: tiny-bert-npu
model: {source: tiny-bert}
calibration: {samples: 16, seq_len: 32}
%s
export:
  - name: npu
    target: npu-qnn
    static_shapes: {batch_size: 2, sequence_length: 32}
check:
  runtime: %s
  export: npu
  seq_len: 32
  windows: 6
  thresholds: {cosine_mean: 0.98, cosine_worst: 0.9}
"""


def test_npu_target_needs_static_shapes(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((BERT_NPU % ("", "ort-cpu")).replace("batch_size: 2, ", ""))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "missing dimension(s): batch_size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_npu_export_refuses_a_quantized_model(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BERT_NPU % ("steps:\n  - quantize: {preset: w8a16}", "ort-cpu"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "quantizes the model itself" in err and "drop the quantize step" in err
    assert not (tmp_path / "out" / "tiny-bert-npu").exists()


def test_npu_export_runs_on_ort_cpu(tmp_path):
    """The static QDQ artifact, checked on the CPU EP (also where onnxruntime-qnn is missing)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BERT_NPU % ("", "ort-cpu"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    art = tmp_path / "out" / "tiny-bert-npu" / "npu"
    m = json.loads((art / "manifest.json").read_text())
    assert m["npu"]["static_shapes"] == {"batch_size": 2, "sequence_length": 32}
    assert m["npu"]["rewrites"]["mask_sentinels_clamped"] and m["npu"]["rewrites"]["l2_normalize_fused"]
    ops = m["onnx"]["op_counts"]
    assert ops["QuantizeLinear"] > 10 and "Gemm" not in ops and "MatMulNBits" not in ops
    assert m["weights"]["params_by_format"]["int8"] > 0  # per-channel MatMul weights
    model = onnx.load(str(art / "model.onnx"))
    assert all(d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim)
    report = json.loads((tmp_path / "out" / "tiny-bert-npu" / "report.json").read_text())
    assert report["check"]["passed"] and report["check"]["sentences"] == 6
    # bench feeds held-out sentences cut to the static length (longer ones would not fit)
    assert main(["bench", str(art), "--runtime", "ort-cpu", "--repeats", "1", "--json"]) == 0


@needs_qnn
def test_npu_export_runs_fully_on_the_htp_and_matches_the_cpu_ep(tmp_path):
    from edgecompress.runtimes import open_runtime

    from edgecompress.artifact import Artifact

    recipe = tmp_path / "r.yaml"
    recipe.write_text(BERT_NPU % ("", "qnn-htp"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    art = Artifact.load(tmp_path / "out" / "tiny-bert-npu" / "npu")
    npu = art.manifest["npu"]
    assert npu["placement"] == {"QNNExecutionProvider": 1}  # one fused HTP partition, no CPU node
    assert npu["context"] == "model_ctx.onnx" and (art.path / "model_ctx.onnx").exists()
    htp = open_runtime("qnn-htp", art)
    assert htp.compiled_from == "context"
    cpu = open_runtime("ort-cpu", art)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (3, 20))  # 3 rows: one padded batch row; 20 tokens: padded to 32
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    a, b = htp.embed(ids, mask), cpu.embed(ids, mask)
    assert a.shape == (3, art.config().hidden_size)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos  # distinct sentences are ~0.95 apart in this model
    assert main(["bench", str(art.path), "--runtime", "qnn-htp", "--repeats", "1", "--json"]) == 0
    with pytest.raises(Exception, match="static sequence length 32"):
        htp.embed(np.ones((1, 40), np.int64), np.ones((1, 40), np.int64))


@needs_qnn
def test_qnn_htp_refuses_a_dynamic_artifact(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: d\nmodel: {source: tiny-bert}\ncalibration: {samples: 2, seq_len: 16}\nexport: [{name: x}]\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--no-bench"]) == 0
    assert main(["check", str(tmp_path / "out" / "d" / "x"), "--runtime", "qnn-htp", "--windows", "2"]) == 2
    assert "not an NPU artifact" in capsys.readouterr().err


@needs_qnn
def test_minilm_npu_recipe_on_the_htp(tmp_path):
    """The shipped recipe on the real model, checked on the HTP simulator with a few held-out sentences."""
    import yaml

    src = yaml.safe_load(Path("recipes/minilm-l6-npu.yaml").read_text())
    src["calibration"]["samples"] = 32
    src["check"]["windows"] = 8
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(src))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "minilm-l6-npu" / "report.json").read_text())
    c = report["check"]
    assert c["passed"] and c["cosine_mean"] >= 0.99 and c["cosine_worst"] >= 0.97 and c["sentences"] == 8


@needs_qnn
def test_image_classifier_npu_artifact_runs_fully_on_the_htp(tmp_path):
    """tiny EfficientNet-Lite: TorchScript export (BN folded), int8 per-channel Conv/Gemm weights, uint16
    activations; the HTP runs it with CPU fallback disabled and agrees with the CPU EP and with torch."""
    import torch
    from edgecompress.export.npu import image_classifier_onnx, write_npu_artifact
    from edgecompress.runtimes.qnn_htp import htp_session

    from edgecompress.models import load_model

    model = load_model("tiny-efficientnet").model.eval()
    proto = image_classifier_onnx(model, size=64)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    rng = np.random.default_rng(0)
    images = [rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32) for _ in range(12)]
    body = write_npu_artifact(proto, tmp_path, [{"pixel_values": x} for x in images[:8]],
                              static_shapes={})
    assert body["npu"]["placement"] == {"QNNExecutionProvider": 1}
    assert body["weights"]["params_by_format"]["int8"] > 0.9 * body["weights"]["weight_params"]
    htp = htp_session(tmp_path / "model_ctx.onnx")
    cpu = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for x in images[8:]:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        a, b = htp.run(None, {"pixel_values": x})[0], cpu.run(None, {"pixel_values": x})[0]
        np.testing.assert_allclose(a, b, atol=0.05 * np.abs(b).max())
        np.testing.assert_allclose(a, ref, atol=0.15 * np.abs(ref).max())
