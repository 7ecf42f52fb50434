"""Online Hadamard rotation of a linear's input (QuaRot) for W8A8: the matrices, the Kronecker
evaluation against the dense product, exactness of the weight rotation, the exported graph against
the torch fake-quant model on ONNX Runtime, and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from edgecompress.cli import main
from edgecompress.compress.quant.activation import affine_params, calibrated_act_quant
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rotation import HadamardRotation, factor_pair, hadamard, rotate_linear_inputs_
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.quant.smoothquant import smoothquant_
from edgecompress.compress.quant.w8a8 import calibrate_activations
from edgecompress.errors import EdgeCompressError
from edgecompress.export.onnx_formats import EmitOptions
from edgecompress.export.onnx_llm import build_llama_decoder
from edgecompress.recipe import parse_recipe

from test_w8a8 import _calib_absmax, assert_decoder_matches_torch


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 48, 240, 576, 1536])
def test_hadamard_is_orthonormal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_orders_without_a_construction_are_refused():
    with pytest.raises(EdgeCompressError, match="order 36"):
        hadamard(36)
    with pytest.raises(EdgeCompressError, match="order 36"):
        HadamardRotation.of_size(36)


def test_factor_pair_is_the_paley_part_times_the_sylvester_part():
    assert factor_pair(1536) == (12, 128)  # QuaRot's H_12 x H_128: 140 multiply-adds per element, not 1536
    assert factor_pair(576) == (144, 4)
    assert factor_pair(240) == (240, 1)  # 12 x 20: both Paley factors in one dense 240 x 240
    assert factor_pair(12) == (12, 1)
    assert factor_pair(128) == (8, 16)  # a power of two: every split is the same matrix; the cheapest one


@pytest.mark.parametrize("n", [12, 128, 576, 1536])
def test_kronecker_evaluation_equals_the_dense_rotation(n):
    rot = HadamardRotation.of_size(n)
    x = torch.randn(2, 7, n)
    want = (x.double() @ rot.matrix()).float()
    torch.testing.assert_close(rot.apply(x), want, atol=1e-5, rtol=1e-5)


def test_rotation_shrinks_the_per_tensor_quantization_error_of_an_outlier_channel():
    """Why it is there: one channel 100x the others forces a coarse per-tensor uint8 grid; after the
    rotation every channel carries a share of it, and the same 8 bits resolve the rest."""
    torch.manual_seed(0)
    x = torch.randn(4096, 128)
    x[:, 5] *= 100.0
    rot = HadamardRotation.of_size(128)

    def error(t: torch.Tensor) -> float:
        stats = {"min": t.amin(0), "max": t.amax(0)}
        return float((calibrated_act_quant(stats, "minmax").fake_quant(t) - t).square().mean())

    assert error(rot.apply(x)) < 0.1 * error(x)


def test_rotated_weights_with_the_rotated_input_compute_the_same_layer(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    rotated = rotate_linear_inputs_(model, (r"mlp\.down_proj$",))
    assert sorted(rotated) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    x = torch.randn(3, 128)
    for name, rot in rotated.items():
        before, after = tiny_llama.get_submodule(name), model.get_submodule(name)
        torch.testing.assert_close(after(rot.apply(x)), before(x), atol=1e-5, rtol=1e-5)


def test_rotation_refuses_tied_weights_and_patterns_matching_nothing(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(EdgeCompressError, match="tied to model.embed_tokens"):
        rotate_linear_inputs_(model, ("lm_head",))
    with pytest.raises(EdgeCompressError, match="matches no float linear"):
        rotate_linear_inputs_(model, ("mlp.down_prj",))
    # every check comes before any weight changes: a refused call leaves the model as it was
    with pytest.raises(EdgeCompressError, match="leave unquantized"):
        rotate_linear_inputs_(model, (r"mlp\.down_proj$",), lambda name: "layers.1." not in name)
    for a, b in zip(model.parameters(), tiny_llama.parameters()):
        assert torch.equal(a, b)


def test_recipe_hadamard_needs_rtn():
    text = """
name: r
model: {source: tiny-llama}
steps:
  - quantize: {preset: w8a8, method: gptq, activations: {hadamard: down_proj}}
export: [{name: q}]
"""
    with pytest.raises(Exception, match="hadamard_needs_rtn|method: rtn"):
        parse_recipe(text)


def _w8a8_rotated(model: nn.Module, cal: torch.Tensor) -> None:
    smoothquant_(model, _calib_absmax(model, cal), alpha=0.5)
    rotated = rotate_linear_inputs_(model, (r"mlp\.down_proj$",))
    apply_rtn(model, RTNConfig(bits=8, group_size=0, symmetric=True, embeddings=False))
    for name, rot in rotated.items():
        model.get_submodule(name).rotation = rot
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    calibrate_activations(model, cal, names, method="minmax")


def test_activation_ranges_are_calibrated_on_the_rotated_input(tiny_llama):
    """The range of a rotated layer's QuantizeLinear is that of ``x R`` (what it quantizes), not of ``x``."""
    torch.manual_seed(0)
    cal = torch.randint(0, 260, (4, 32))
    model = copy.deepcopy(tiny_llama)
    _w8a8_rotated(model, cal)
    down = model.model.layers[1].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    act, down.act = down.act, None  # the inputs as calibration saw them: no quantization anywhere before
    acts = {m: m.act for m in model.modules() if isinstance(m, QuantLinear)}
    for m in acts:
        m.act = None
    with torch.no_grad():
        for row in cal:
            model(row[None])
    handle.remove()
    for m, a in acts.items():
        m.act = a
    rotated = down.rotation.apply(torch.cat(seen))
    want = affine_params(rotated.min(), rotated.max(), 8)
    torch.testing.assert_close(act.scale, want[0])
    assert int(act.zero_point) == int(want[1])
    plain = torch.cat(seen)
    assert not torch.allclose(act.scale, affine_params(plain.min(), plain.max(), 8)[0])


def test_w8a8_with_rotated_down_proj_on_ort_matches_torch(tiny_llama):
    torch.manual_seed(0)
    cal = torch.randint(0, 260, (4, 32))
    model = copy.deepcopy(tiny_llama)
    _w8a8_rotated(model, cal)
    proto, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0))
    down = [f for f in formats if f.module.endswith("down_proj")]
    assert len(down) == 2 and all(f.onnx_op.startswith("Hadamard+QuantizeLinear") for f in down)
    assert all(f.format.endswith("-hadamard") for f in down)
    # the factors are stored once and shared by both layers
    assert sorted(t.name for t in proto.graph.initializer if t.name.startswith("hadamard.")) == [
        "hadamard.16", "hadamard.8.t"]
    assert_decoder_matches_torch(proto, model)


RECIPE = """\
name: tiny-llama-hadamard
model: {source: tiny-llama}
calibration: {samples: 4, seq_len: 64}
steps:
  - smoothquant: {alpha: auto}
  - quantize: {preset: w8a8, activations: {observer: mse, float_prefix: true, hadamard: 'mlp\\.down_proj$'}}
export: [{name: q}]
check: {seq_len: 64, windows: 2, thresholds: {perplexity_ratio: 1.2}}
"""


def test_recipe_records_the_rotation_and_checks_on_ort(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--no-bench"]) == 0
    run = tmp_path / "out" / "tiny-llama-hadamard"
    m = json.loads((run / "q" / "manifest.json").read_text())
    rotations = [r for r in m["steps"][1]["modules"] if "input_rotation" in r]
    assert [r["module"] for r in rotations] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert rotations[0]["input_rotation"] == {"kind": "hadamard", "size": 128, "factors": [8, 16]}
    layers = {r["module"]: r for r in m["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["format"].endswith("-hadamard")
    report = json.loads((run / "report.json").read_text())
    assert report["check"]["passed"] and report["check"]["perplexity_ratio"] < 1.2


def test_recipe_refuses_a_rotated_layer_left_unquantized(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("hadamard: 'mlp\\.down_proj$'}}",
                                     "hadamard: 'mlp\\.down_proj$'}, ignore: ['layers\\.1\\.mlp']}"))
    assert "ignore: ['layers" in recipe.read_text()
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "--no-bench"]) != 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().err
    assert not (out / "tiny-llama-hadamard" / "q").exists()
