"""Activation sparsity (TEAL / WINA): thresholds, criterion, greedy allocation, ONNX export, recipe errors."""

from __future__ import annotations

import copy
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecompress.compress.calibration.observers import LogHistogramObserver
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.sparse.activation import (ActSparseLinear, ActSparsifyConfig, allocate_greedy,
                                                      apply_act_sparsify, measure_sparsity, site_threshold,
                                                      wina_scale)
from edgecompress.errors import EdgeCompressError, RecipeError
from edgecompress.export.onnx_formats import EmitOptions
from edgecompress.export.onnx_llm import build_llama_decoder


def _calib() -> torch.Tensor:
    return torch.randint(0, 260, (6, 48), generator=torch.Generator().manual_seed(0))


def test_log_histogram_threshold_gives_the_sparsity_within_one_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=g) * 0.05
    x[0, :4] = 3000.0  # massive activations: a linear histogram over [0, 3000] could not resolve 0.05
    obs = LogHistogramObserver()
    for chunk in x.split(100):
        obs.update(chunk)
    a = x.abs().flatten().numpy()
    for s in (0.1, 0.4, 0.5, 0.9):
        t = obs.threshold_for_sparsity(s)
        lo, hi = np.mean(a <= t / obs.ratio), np.mean(a <= t * obs.ratio)
        assert lo <= s <= hi, (s, lo, hi)
        assert abs(np.mean(a <= t) - s) < 0.01
    assert obs.threshold_for_sparsity(0.0) == 0.0


@pytest.mark.parametrize("quantized", [False, True])
def test_wina_criterion_equals_numpy(quantized):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    inner = lin
    if quantized:
        model = nn.Sequential(lin)
        apply_rtn(model, RTNConfig(bits=4, group_size=8, embeddings=False))
        inner = model[0]
    w = inner.weight.detach().numpy()
    scale = wina_scale([inner.weight])
    np.testing.assert_allclose(scale.numpy(), np.linalg.norm(w, axis=0), rtol=1e-6)
    mod = ActSparseLinear(inner, site_threshold(0.5, scale), site="s", method="wina")
    x = torch.randn(7, 24)
    keep = np.abs(x.numpy()) * np.linalg.norm(w, axis=0) > 0.5
    ref = np.where(keep, x.numpy(), 0.0) @ w.T + lin.bias.detach().numpy()
    assert 0.1 < keep.mean() < 0.9  # the test threshold cuts
    assert (mod.keep(x).numpy() != keep).mean() < 1e-3  # t / ||W_j|| vs |x| * ||W_j||: rounding at the edge only
    with torch.no_grad():
        np.testing.assert_allclose(mod(x).numpy(), np.where(mod.keep(x).numpy(), x.numpy(), 0) @ w.T
                                   + lin.bias.detach().numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(mod(x).numpy() - ref).max() < 1e-1


def test_greedy_allocation_meets_the_target_and_prefers_cheap_sites():
    levels = np.linspace(0, 0.9, 10)
    costs = {"cheap": levels ** 2, "dear": 10 * levels ** 2, "free": np.zeros(10)}
    params = {"cheap": 100, "dear": 100, "free": 50}
    alloc = allocate_greedy(costs, params, levels, 0.5)
    assert sum(alloc[s] * params[s] for s in params) / 250 == pytest.approx(0.5)
    assert alloc["free"] == pytest.approx(0.9) and alloc["cheap"] > alloc["dear"]
    assert allocate_greedy(costs, params, levels, 0.0) == {"cheap": 0.0, "dear": 0.0, "free": 0.0}
    with pytest.raises(ValueError, match="above"):
        allocate_greedy(costs, params, levels, 0.95)


@pytest.mark.parametrize("method,cost_at", [("teal", "final"), ("wina", "block")])
def test_greedy_hits_the_model_wide_target_and_beats_uniform(tiny_llama, method, cost_at):
    ids = _calib()
    with torch.no_grad():
        dense = tiny_llama(ids).logits
    err = {}
    for alloc in ("uniform", "greedy"):
        model = copy.deepcopy(tiny_llama)
        records = apply_act_sparsify(model, ids, ActSparsifyConfig(method=method, sparsity=0.5, allocation=alloc,
                                                                   cost_at=cost_at))
        assert len(records) == 8 and all(r["method"] == method for r in records)
        total = sum(r["params"] for r in records)
        assert sum(r["target_sparsity"] * r["params"] for r in records) / total == pytest.approx(0.5)
        assert measure_sparsity(model, ids)["sparsity"] == pytest.approx(0.5, abs=0.02)
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.threshold is attn.k_proj.threshold is attn.v_proj.threshold  # one shared input
        with torch.no_grad():
            err[alloc] = float((model(ids).logits - dense).pow(2).mean())
    assert err["greedy"] < err["uniform"], err


def _ort_logits(proto, ids: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run(["logits"], feeds)[0][0]


def _assert_ort_equals_torch_and_differs_from_dense(proto, model, dense_model) -> None:
    ids = torch.randint(0, 260, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
        dense = dense_model(ids).logits[0].numpy()
    got = _ort_logits(proto, ids.numpy())
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert np.abs(got - dense).max() > 100 * 2e-4  # the thresholds act in the graph


@pytest.mark.parametrize("method,int4,fuse", [("teal", False, True), ("wina", True, True), ("teal", True, False)])
def test_onnx_export_runs_in_ort_like_torch(tiny_llama, method, int4, fuse):
    model = copy.deepcopy(tiny_llama)
    if int4:
        apply_rtn(model, RTNConfig(bits=4, group_size=32, embeddings=False))
    apply_act_sparsify(model, _calib(), ActSparsifyConfig(method=method, sparsity=0.5, allocation="uniform"))
    proto, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0), fuse=fuse)
    assert sum(n.op_type == "ActSparse" for n in proto.graph.node) == 8  # once per shared input
    assert any(f.name == "ActSparse" and f.domain == "edgecompress" for f in proto.functions)
    assert ("edgecompress", 1) in {(o.domain, o.version) for o in proto.opset_import}
    inner = "MatMulNBits" if int4 else "MatMul"
    proj = [f for f in formats if f.module.startswith("model.layers.")]
    assert all(f.onnx_op == f"edgecompress::ActSparse+{inner}" for f in proj)
    _assert_ort_equals_torch_and_differs_from_dense(proto, model, tiny_llama)


def test_torch_runtime_reapplies_the_stored_thresholds(tmp_path):
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes.torch_ref import load_torch_model

    lm = load_model("tiny-llama")
    apply_act_sparsify(lm.model, _calib(), ActSparsifyConfig(method="wina", sparsity=0.4, allocation="uniform"))
    body = export_causal_lm(lm.model, tmp_path, accuracy_level=0)
    lm.save_hf_files(tmp_path)
    write_manifest(tmp_path, {"task": "causal-lm", **body})
    decoded = load_torch_model(Artifact.load(tmp_path))
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(decoded(ids).logits.numpy(), lm.model(ids).logits.numpy(), atol=1e-5)


def test_bad_targets_and_twice_are_errors(tiny_llama):
    with pytest.raises(EdgeCompressError, match="matches no module"):
        apply_act_sparsify(tiny_llama, _calib(), ActSparsifyConfig(targets=("qkv_proj",)))
    with pytest.raises(RecipeError, match="selects no linear"):
        apply_act_sparsify(tiny_llama, _calib(), ActSparsifyConfig(targets=("lm_head",)))
    apply_act_sparsify(tiny_llama, _calib(), ActSparsifyConfig(allocation="uniform"))
    with pytest.raises(RecipeError, match="already activation-sparse"):
        apply_act_sparsify(tiny_llama, _calib(), ActSparsifyConfig(allocation="uniform"))


@pytest.mark.parametrize("body,needle", [
    ("{sparsity: 1.0}", "steps[0].sparsify_activations.sparsity: must be < 1.0, got 1.0"),
    ("{sparsity: -0.1}", "steps[0].sparsify_activations.sparsity: must be >= 0"),
    ("{method: magnitude}", "'magnitude' is not one of 'teal', 'wina', 'cats'"),
    ("{method: cats, allocation: greedy}", "method cats puts every MLP at the same sparsity: allocation must be uniform"),
    ("{allocation: owl}", "'owl' is not one of 'greedy', 'uniform'"),
    ("{sparsity: 0.9, max_level: 0.8}", "sparsity 0.9 is above max_level 0.8"),
])
def test_recipe_errors_name_the_key(body, needle):
    from edgecompress.recipe import parse_recipe

    text = textwrap.dedent(f"""\
        name: x
        model: {{source: tiny-llama}}
        steps:
          - sparsify_activations: {body}
        export: [{{format: onnx}}]
        """)
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "x.yaml")
    assert needle in str(info.value) and "x.yaml line 4" in str(info.value)


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_check_measures_the_activation_sparsity_like_torch(tmp_path, method):
    """The check's ``activation_sparsity`` (ONNX Runtime on the exported graph, ActSparse outputs exposed)
    equals the torch model's parameter-weighted measurement on the same windows."""
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.check import measured_act_sparsity
    from edgecompress.compress.sparse.activation import measure_cats_sparsity
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model

    lm = load_model("tiny-llama")
    cfg = ActSparsifyConfig(method=method, sparsity=0.5, allocation="uniform", ignore=("o_proj",))
    apply_act_sparsify(lm.model, _calib(), cfg)
    body = export_causal_lm(lm.model, tmp_path, accuracy_level=0)
    write_manifest(tmp_path, {"task": "causal-lm", **body})
    rows = torch.randint(0, 260, (3, 40), generator=torch.Generator().manual_seed(4))
    got = measured_act_sparsity(Artifact.load(tmp_path), rows)
    # torch: CATS weighs every MLP alike (each skips the same up/down columns), TEAL by parameters
    want = (measure_cats_sparsity if method == "cats" else measure_sparsity)(lm.model, rows)["sparsity"]
    assert 0.3 < want < 0.7
    assert got == pytest.approx(want, abs=1e-6)
    dense = load_model("tiny-llama")
    (tmp_path / "dense").mkdir()
    body = export_causal_lm(dense.model, tmp_path / "dense", accuracy_level=0)
    write_manifest(tmp_path / "dense", {"task": "causal-lm", **body})
    assert measured_act_sparsity(Artifact.load(tmp_path / "dense"), rows) is None


def _run_tiny(text: str, out) -> tuple[dict, object]:
    """Run an inline recipe quietly: (report, the artifact of its first export)."""
    from edgecompress.artifact import Artifact
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import parse_recipe

    recipe = parse_recipe(textwrap.dedent(text))
    report = run_recipe(recipe, out, progress=False)
    return report, Artifact.load(out / recipe.name / recipe.export[0].name)


def _runtimes_agree(art, atol: float = 1e-4) -> None:
    from edgecompress.runtimes import open_runtime

    ids = np.arange(5, 45, dtype=np.int64)
    np.testing.assert_allclose(open_runtime("ort-cpu", art).logits(ids), open_runtime("torch", art).logits(ids),
                               atol=atol)


def test_recipe_runs_end_to_end_and_both_runtimes_agree(tmp_path):
    report, art = _run_tiny("""\
        name: tiny-teal
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 64}
        steps:
          - quantize: {method: rtn, bits: 4, group_size: 32, embeddings: false}
          - sparsify_activations: {method: teal, sparsity: 0.4, ignore: ['down_proj']}
        export:
          - {format: onnx, name: teal, accuracy_level: 0}
        check: {runtime: ort-cpu, seq_len: 64, windows: 2}
        """, tmp_path)
    ops = report["exports"]["teal"]["op_counts"]
    assert ops["edgecompress::ActSparse"] == 2 * 3  # q/k/v, o, gate/up per layer; down stays dense
    records = [r for s in art.manifest["steps"] if s["step"] == "sparsify_activations" for r in s["modules"]]
    assert len(records) == 6 and all(r["threshold"] > 0 for r in records if r["target_sparsity"] > 0)
    _runtimes_agree(art)


def test_cost_propagation_does_not_leak_into_later_blocks_inputs(tiny_llama):
    """The final-unit costs run later blocks on perturbed outputs; those runs must not be recorded as the
    later blocks' calibration inputs (the costs would then be measured on the wrong data)."""
    from edgecompress.compress.sparse.activation import greedy_costs

    ids = _calib()
    cfg = ActSparsifyConfig(cost_windows=3, cost_at="final")
    final, block = greedy_costs(tiny_llama, ids, cfg), greedy_costs(tiny_llama, ids, ActSparsifyConfig(
        cost_windows=3, cost_at="block"))
    for key in block:  # the same curve, rescaled by one positive factor per site
        ratio = final[key][1:] / block[key][1:]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
        assert ratio[0] > 0


# -- CATS ---------------------------------------------------------------------------------------


def test_cats_thresholds_give_the_sparsity_and_match_the_definition(tiny_llama):
    from edgecompress.compress.sparse.activation import CatsActivation, measure_cats_sparsity

    model = copy.deepcopy(tiny_llama)
    records = apply_act_sparsify(model, _calib(), ActSparsifyConfig(method="cats", sparsity=0.5, allocation="uniform"))
    assert [r["module"] for r in records] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for r, layer in zip(records, model.model.layers):
        act = layer.mlp.act_fn
        assert isinstance(act, CatsActivation) and float(act.threshold) == pytest.approx(r["threshold"])
        assert r["calibration_sparsity"] == pytest.approx(0.5, abs=0.02)  # log-histogram quantile on the same data
        assert r["params"] == layer.mlp.up_proj.weight.numel() + layer.mlp.down_proj.weight.numel()
        x = torch.randn(3, 5, 128)
        y = torch.nn.functional.silu(x)
        torch.testing.assert_close(act(x), torch.where(y.abs() > r["threshold"], y, torch.zeros(())))
    # block 1's threshold was calibrated on block 0 already sparsified: the measured sparsity agrees
    assert measure_cats_sparsity(model, _calib())["sparsity"] == pytest.approx(0.5, abs=0.02)
    # only up/down read fewer weights: the other linears are untouched
    assert not any(isinstance(m, ActSparseLinear) for m in model.modules())


@pytest.mark.parametrize("int4", [False, True])
def test_cats_onnx_export_runs_in_ort_like_torch(tiny_llama, int4):
    model = copy.deepcopy(tiny_llama)
    if int4:
        apply_rtn(model, RTNConfig(bits=4, group_size=32, embeddings=False))
    apply_act_sparsify(model, _calib(), ActSparsifyConfig(method="cats", sparsity=0.6, allocation="uniform"))
    proto, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=0), fuse=True)
    nodes = [n for n in proto.graph.node if n.op_type == "ActSparse"]
    assert len(nodes) == 2 and all(n.name.endswith(".mlp/ActSparse") for n in nodes)
    down = [f for f in formats if f.module.endswith("down_proj")]
    assert all(f.format.endswith("+cats") and f.initializers["cats_threshold"].endswith(".mlp.cats_threshold")
               for f in down)
    _assert_ort_equals_torch_and_differs_from_dense(proto, model, tiny_llama)


def test_cats_recipe_end_to_end_torch_runtime_agrees(tmp_path):
    from edgecompress.runtimes import open_runtime

    report, art = _run_tiny("""\
        name: tiny-cats
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 64}
        steps:
          - sparsify_activations: {method: cats, sparsity: 0.5}
        export:
          - {format: onnx, name: cats, accuracy_level: 0}
        """, tmp_path)
    assert art.manifest["recipe"]["steps"][0]["sparsify_activations"]["allocation"] == "uniform"  # cats' default
    assert report["exports"]["cats"]["op_counts"]["edgecompress::ActSparse"] == 2
    _runtimes_agree(art)
    with pytest.raises(RecipeError, match="already activation-sparse"):
        apply_act_sparsify(open_runtime("torch", art).model, _calib(),
                           ActSparsifyConfig(method="cats", sparsity=0.5, allocation="uniform"))
