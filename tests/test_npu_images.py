"""Image classifiers on the NPU target: the int8 weight rounding cores (GPTQ on conv patches, bias
correction) against numerical oracles, the image sources, and the recipe path end to end on the tiny
EfficientNet (ort-cpu; qnn-htp where onnxruntime-qnn is installed)."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from edgecompress.compress.quant.conv_rounding import (
    ConvRoundingConfig,
    channel_scales,
    conv_patches,
    gptq_fixed_scale,
    patch_hessian,
    round_conv_weights,
    round_nearest,
)
from edgecompress.runtimes.qnn_htp import qnn_version
from torch import nn

from edgecompress.cli import main
from edgecompress.efficientnet import fold_batchnorm
from edgecompress.models import load_model

needs_qnn = pytest.mark.skipif(qnn_version() is None, reason="onnxruntime-qnn is not installed")


def _layer_error(W, Wq, H):
    d = (Wq - W).double()
    return float(((d @ H.double()) * d).sum())


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_patches_reproduce_the_convolution(depthwise):
    g = torch.Generator().manual_seed(0)
    c = 6
    conv = nn.Conv2d(c, c if depthwise else 5, 3, stride=2, padding=1, groups=c if depthwise else 1)
    x = torch.randn(2, c, 9, 9, generator=g)
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, groups=conv.groups)
    P = conv_patches(conv, x)
    W = conv.weight.detach().flatten(1)
    if depthwise:  # [C, positions, 9] against each channel's own 9 weights
        out = torch.einsum("cpk,ck->cp", P, W)
        ref = y.permute(1, 0, 2, 3).reshape(c, -1)
    else:
        out, ref = P @ W.T, y.permute(0, 2, 3, 1).reshape(-1, W.shape[0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert patch_hessian(P).shape == ((c, 9, 9) if depthwise else (1, W.shape[1], W.shape[1]))


@pytest.mark.parametrize("per_row", [False, True])
def test_gptq_on_the_fixed_grid_beats_nearest_rounding(per_row):
    """Layer error tr(dW H dWᵀ) on correlated inputs: GPTQ < nearest; codes are integers in ±127 of the
    max|W|/127 scale, so the exporter writes them exactly."""
    g = torch.Generator().manual_seed(1)
    n, k = 16, 24
    W = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g)
    X = torch.randn(4000, k, generator=g) @ mix  # correlated inputs: where error feedback pays
    if per_row:  # one Hessian per output row (a depthwise convolution)
        Xs = X[None] * torch.rand(n, 1, k, generator=g)
        H = Xs.transpose(1, 2) @ Xs / len(X)
    else:
        H = (X.T @ X / len(X))[None]
    s = channel_scales(W)
    Wg, Wn = gptq_fixed_scale(W, H, s), round_nearest(W, s)
    codes = Wg / s[:, None]
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.abs().max() <= 127 + 1e-4
    err = lambda Wq: sum(_layer_error(W[i:i + 1], Wq[i:i + 1], H[i if per_row else 0]) for i in range(n))  # noqa: E731
    assert err(Wg) < 0.7 * err(Wn), (err(Wg), err(Wn))
    # the lazy batch update (blocks of 5 columns) gives the column-by-column result
    torch.testing.assert_close(gptq_fixed_scale(W, H, s, block=5), gptq_fixed_scale(W, H, s, block=k), atol=1e-6, rtol=0)


def _tiny_folded():
    return fold_batchnorm(load_model("tiny-efficientnet").model.eval())


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 8, 8, generator=g)  # smooth images: upsampled noise, like natural ones
    return F.interpolate(base, size=64, mode="bilinear", align_corners=False).clamp(-1, 1)


def _rounded_error(cfg, cal, held, ref):
    """Relative held-out logit error of the tiny model rounded with ``cfg``; checks every weight is on its grid."""
    m = _tiny_folded()
    scales, _ = round_conv_weights(m, cal, cfg)
    for name, s in scales.items():
        w = m.state_dict()[name]
        q = w / s.view(-1, *([1] * (w.dim() - 1)))
        torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
    with torch.no_grad():
        return float((m(held) - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def rounding_case():
    cal, held = _images(12, 0), _images(8, 1)
    with torch.no_grad():
        ref = _tiny_folded()(held)
    base = _rounded_error(ConvRoundingConfig(method="nearest", bias_correction=False), cal, held, ref)
    return cal, held, ref, base


@pytest.mark.parametrize("method,bias_correction", [("nearest", True), ("gptq", False), ("gptq", True)])
def test_weight_rounding_reduces_the_output_error_on_held_out_images(rounding_case, method, bias_correction):
    """Against nearest rounding without correction: held-out logits move less from fp32 (the oracle is the
    fp32 model's output); every weight ends on its int8 grid."""
    cal, held, ref, base = rounding_case
    better = _rounded_error(ConvRoundingConfig(method=method, bias_correction=bias_correction), cal, held, ref)
    assert better < 0.8 * base, (better, base)


def test_bias_correction_removes_the_mean_shift_of_one_layer():
    """One conv, inputs with a nonzero mean: after correction the mean output shift per channel is ~0."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(8, 4, 10, 10) + 2.0
    with torch.no_grad():
        conv.weight.mul_(7.3)  # awkward magnitudes: rounding errors do not cancel
        y = model(x)
    round_conv_weights(model, x, ConvRoundingConfig(method="nearest", bias_correction=True))
    with torch.no_grad():
        shift = (model(x) - y).mean((0, 2, 3))
    assert shift.abs().max() < 1e-4


def test_depthwise_weights_are_per_output_channel_and_symmetric_in_the_qdq_graph(tmp_path):
    """The question behind the 0.77: the depthwise Conv's int8 weights carry one scale per output channel
    (axis 0), zero points 0, and equal the rounded torch weights."""
    from edgecompress.export.npu import export_npu_image_classifier
    from onnx import numpy_helper

    model = load_model("tiny-efficientnet").model.eval()
    body = export_npu_image_classifier(model, tmp_path, _images(4, 0).numpy(),
                                       static_shapes={"batch_size": 1, "image_size": 64}, rounding="nearest",
                                       bias_correction=False)
    assert body["npu"]["weight_rounding"]["layers"] == 1 + sum(2 + b.has_expand for b in model._blocks) + 2
    qdq = onnx.load(str(tmp_path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dq = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    depthwise = [n for n in qdq.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert depthwise
    for conv in depthwise:
        d = dq[conv.input[1]]
        q, scale, zp = (inits[t] for t in d.input)
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],) and not zp.any()
        assert next(a.i for a in d.attribute if a.name == "axis") == 0
        w = (q * scale[:, None, None, None]).astype(np.float32)
        np.testing.assert_allclose(np.abs(w).reshape(len(w), -1).max(1), 127 * scale, rtol=1e-6)


def test_off_grid_names_weights_the_qdq_model_changed():
    """The export's guard: a weight whose dequantized codes differ from the rounded torch weight is reported
    with how many channels moved and by how much (relative to the layer's max |W|)."""
    from edgecompress.export.npu import _off_grid
    from onnx import helper, numpy_helper

    q, sc = np.array([[127, -3], [1, 0]], np.int8), np.array([0.01, 1e-3], np.float32)
    inits = [numpy_helper.from_array(q, "w_quantized"), numpy_helper.from_array(sc, "w_scale"),
             numpy_helper.from_array(np.zeros(2, np.int8), "w_zero_point")]
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"],
                                            axis=0)], "g", [], [helper.make_tensor_value_info("w", 1, [2, 2])], inits)
    m = helper.make_model(g)
    w = (q.astype(np.float64) * sc[:, None]).astype(np.float32)
    assert _off_grid(m, {"w": w}) == {}
    w[1, 1] = 4e-4
    off = _off_grid(m, {"w": w})
    assert off["w"]["channels"] == 1 and off["w"]["max_change"] == pytest.approx(4e-4 / 1.27, rel=1e-5)
    assert _off_grid(m, {"v": w})["v"]["max_change"] is None  # not in the QDQ model at all


# ----------------------------------------------------------------------------- image sources

def _png_folder(path, n, seed):
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.Resampling.BILINEAR).save(path / f"img{i}.png")
    return path


def test_image_crops_are_seeded_normalised_and_spread_over_files(tmp_path):
    pytest.importorskip("PIL")
    from edgecompress.images import image_crops

    folder = _png_folder(tmp_path / "imgs", 3, 0)
    a = image_crops(str(folder), 5, 32, seed=0)
    assert a.shape == (5, 3, 32, 32) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    np.testing.assert_array_equal(a, image_crops(str(folder), 5, 32, seed=0))
    assert not np.array_equal(a, image_crops(str(folder), 5, 32, seed=1))


def test_skimage_sources_split_by_file():
    pytest.importorskip("skimage")
    from edgecompress.images import load_images

    cal, ev = load_images("skimage:calib"), load_images("skimage:eval")
    assert len(cal) >= 10 and len(ev) >= 10
    assert not {n for n, _ in cal} & {n for n, _ in ev}
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for _, im in cal + ev)


@pytest.mark.parametrize("source,message", [("skimage:train", "unknown image source"),
                                            ("EMPTY/", "no images in")])
def test_bad_image_sources(tmp_path, source, message):
    from edgecompress.errors import DataError
    from edgecompress.images import image_crops

    (tmp_path / "EMPTY").mkdir()
    with pytest.raises(DataError, match=message):
        image_crops(source.replace("EMPTY", str(tmp_path / "EMPTY")), 2, 32)


# ----------------------------------------------------------------------------- recipe path

RECIPE = """\
name: tiny-effnet-npu
model: {source: tiny-efficientnet}
calibration: {data: %s, samples: 8}
%s
export:
  - name: npu
    target: npu-qnn
    static_shapes: %s
check:
  runtime: %s
  export: npu
  data: %s
  windows: 5
  thresholds: {top1_agreement: 0.6, top5_agreement: 1.0}
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("images")
    return str(_png_folder(root / "calib", 4, 0)), str(_png_folder(root / "eval", 3, 1))


@pytest.fixture(scope="module")
def tiny_run(folders, tmp_path_factory):
    """The image recipe end to end on ort-cpu (batch 2: the check pads the last batch)."""
    out = tmp_path_factory.mktemp("run")
    recipe = out / "r.yaml"
    recipe.write_text(RECIPE % (folders[0], "", "{batch_size: 2, image_size: 64}", "ort-cpu", folders[1]))
    assert main(["run", str(recipe), "-o", str(out / "out")]) == 0
    return out / "out" / "tiny-effnet-npu"


def test_image_recipe_end_to_end_on_ort_cpu(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    c = report["check"]
    assert c["passed"] and c["images"] == 5 and c["runtime"] == "ort-cpu"
    m = json.loads((tiny_run / "npu" / "manifest.json").read_text())
    assert m["task"] == "image-classifier"
    assert m["npu"]["static_shapes"] == {"batch_size": 2, "image_size": 64}
    assert m["npu"]["inputs"] == {"pixel_values": [2, 3, 64, 64]}
    wr = m["npu"]["weight_rounding"]
    assert wr["method"] == "gptq" and wr["bias_correction"] and wr["calibration_images"] == 8
    assert m["calibration"]["images"] == 8 and m["weights"]["params_by_format"]["int8"] > 0
    assert all(r["rel_error_corrected"] <= r["rel_error"] + 1e-6 for r in wr["per_layer"])


@needs_qnn
def test_image_artifact_on_the_htp_matches_the_cpu_ep(tiny_run, folders, capsys):
    from edgecompress.runtimes import open_runtime

    from edgecompress.artifact import Artifact
    from edgecompress.images import image_crops

    art = Artifact.load(tiny_run / "npu")
    assert art.manifest["npu"]["placement"] == {"QNNExecutionProvider": 1}
    htp, cpu = open_runtime("qnn-htp", art), open_runtime("ort-cpu", art)
    assert htp.compiled_from == "context"
    x = image_crops(folders[1], 3, 64)
    a, b = htp.classify(x), cpu.classify(x)
    assert a.shape == (3, 10)
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(b).max())
    assert main(["check", str(art.path), "--runtime", "qnn-htp", "--data", folders[1], "--windows", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    assert main(["bench", str(art.path), "--runtime", "qnn-htp", "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images_s"] > 0


def test_image_recipe_needs_a_static_image_size(folders, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % (folders[0], "", "{batch_size: 1, sequence_length: 64}", "ort-cpu", folders[1]))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 8" in err and "static_shapes" in err and "missing dimension(s): image_size" in err


@pytest.mark.parametrize("data,steps,message", [
    ("pydoc:calib", "", "is text"),
    ("FOLDER", "steps:\n  - quantize: {preset: w8a16}", "steps are for language models"),
])
def test_image_recipe_errors(folders, tmp_path, capsys, data, steps, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % (data.replace("FOLDER", folders[0]), steps,
                                "{batch_size: 1, image_size: 64, sequence_length: 8}", "ort-cpu", folders[1]))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny-effnet-npu").exists()
