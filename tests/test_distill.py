"""Low-rank distillation: hooked deltas equal merged weights, training lowers the KL to the reference on
held-out tokens, formats and thresholds survive, the pipeline step, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.compress.lowrank.distill import Deltas, DistillConfig, apply_distill, distill_targets
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.sparse.activation import ActSparseLinear, ActSparsifyConfig, apply_act_sparsify
from edgecompress.errors import RecipeError


def windows(n: int, length: int, seed: int, vocab: int = 260) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def mean_kl(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        kls = [F.kl_div(F.log_softmax(model(input_ids=w[None]).logits[0], -1),
                        F.log_softmax(reference(input_ids=w[None]).logits[0], -1), log_target=True,
                        reduction="batchmean") for w in ids]
    return float(torch.stack(kls).mean())


def test_hooked_deltas_equal_merged_weights(tiny_llama):
    cfg = DistillConfig(rank=4)
    chosen = distill_targets(tiny_llama, cfg)
    assert len(chosen) == 2 * 7 and all(type(m) is nn.Linear for m in chosen.values())
    deltas = Deltas(chosen, cfg.rank, seed=3)
    with torch.no_grad():
        for b in deltas.B.values():
            b.normal_(0, 0.05)  # B starts at zero; any value must merge exactly
    ids = windows(2, 24, seed=1)
    with torch.no_grad(), deltas.applied():
        hooked = tiny_llama(input_ids=ids).logits
    plain = tiny_llama(input_ids=ids).logits.detach()
    deltas.merge()
    merged = tiny_llama(input_ids=ids).logits.detach()
    assert (hooked - plain).abs().max() > 1e-2  # the deltas do something
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)


def test_distill_recovers_a_low_rank_perturbation_on_held_out_tokens(tiny_llama):
    """Oracle: the "compressed" model is the reference plus rank-2 changes in two layers, which rank-4
    deltas can undo exactly; training on some random windows must close most of the KL on others."""
    with torch.no_grad():
        tiny_llama.model.norm.weight *= 4  # sharper next-token distributions: a KL worth closing
    reference = copy.deepcopy(tiny_llama)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lin in (tiny_llama.model.layers[0].mlp.down_proj, tiny_llama.model.layers[1].self_attn.o_proj):
            u, v = torch.randn(lin.out_features, 2, generator=g), torch.randn(2, lin.in_features, generator=g)
            lin.weight += 0.5 * u @ v / lin.in_features ** 0.5
    held = windows(8, 48, seed=9)
    before = mean_kl(tiny_llama, reference, held)
    records = apply_distill(tiny_llama, reference, windows(16, 48, seed=0), DistillConfig(rank=4, steps=150, lr=1e-2))
    after = mean_kl(tiny_llama, reference, held)
    assert before > 0.1 and after < 0.4 * before, (before, after)
    summary = records[0]["distill"]
    assert summary["kl_last_tenth"] < 0.5 * summary["kl_first_tenth"]
    assert summary["layers"] == 14 and len(records) == 15
    assert all(p.requires_grad for p in tiny_llama.parameters())
    assert all(not m._forward_hooks for m in tiny_llama.modules())


def test_distill_keeps_activation_sparse_formats_and_thresholds(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    calib = windows(4, 32, seed=0)
    apply_act_sparsify(tiny_llama, calib, ActSparsifyConfig(sparsity=0.6, allocation="uniform"))
    thresholds = {n: m.threshold.clone() for n, m in tiny_llama.named_modules() if isinstance(m, ActSparseLinear)}
    weights = {n: m.inner.weight.clone() for n, m in tiny_llama.named_modules() if isinstance(m, ActSparseLinear)}
    records = apply_distill(tiny_llama, reference, calib, DistillConfig(rank=4, steps=10, lr=1e-2))
    sparse = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, ActSparseLinear)}
    assert sparse.keys() == thresholds.keys() and len(sparse) == 2 * 7
    assert all(torch.equal(sparse[n].threshold, t) and type(sparse[n].inner) is nn.Linear for n, t in thresholds.items())
    assert all(not torch.equal(sparse[n].inner.weight, w) for n, w in weights.items())
    assert {r["module"] for r in records[1:]} == set(sparse)  # named as the recipe names them (no ".inner")


def test_distill_leaves_unselected_layers_alone(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    apply_act_sparsify(tiny_llama, windows(4, 32, 0), ActSparsifyConfig(sparsity=0.6, allocation="uniform"))
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    apply_distill(tiny_llama, reference, windows(2, 32, 1), DistillConfig(rank=2, steps=5, lr=1e-2, ignore=("mlp",)))
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("self_attn" in n and n.endswith("weight") for n in changed), changed


def test_distill_refuses_packed_layers_and_oversized_ranks(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    with pytest.raises(RecipeError, match="rank 100 exceeds"):
        distill_targets(tiny_llama, DistillConfig(rank=100))
    with pytest.raises(RecipeError, match="selects no float linear"):
        distill_targets(tiny_llama, DistillConfig(ignore=(".*",)))
    apply_rtn(tiny_llama, RTNConfig(bits=4, group_size=32, targets=("mlp",), embeddings=False))
    with pytest.raises(RecipeError, match="already quantized or weight-sparse") as e:
        apply_distill(tiny_llama, reference, windows(1, 8, 0), DistillConfig(rank=2, steps=1))
    assert "before the quantize" in e.value.hint
    with pytest.raises(ValueError, match="steps must be"):
        DistillConfig(steps=0)


def test_distill_needs_a_decoder():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RecipeError, match="Llama-family"):
        distill_targets(model, DistillConfig())


def test_recipe_distill_step_and_its_order():
    from pydantic import ValidationError

    from edgecompress.recipe import DistillStep, Recipe

    base = {"name": "r", "model": {"source": "tiny-llama"}, "export": [{"format": "onnx"}]}
    r = Recipe.model_validate({**base, "steps": [{"sparsify_activations": {"allocation": "uniform"}},
                                                 {"distill": {"rank": 8, "steps": 10}}]})
    assert isinstance(r.steps[1], DistillStep) and r.steps[1].rank == 8 and r.steps[1].samples == 64
    with pytest.raises(ValidationError, match="put distill before steer"):
        Recipe.model_validate({**base, "steps": [{"steer": {"pairs": "builtin:concise-answers", "layers": [1], "strength": 1.0}},
                                                 {"distill": {}}]})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Recipe.model_validate({**base, "steps": [{"distill": {"rank": 0}}]})


def test_pipeline_runs_distill_and_records_it(tmp_path):
    import json

    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "tiny-distill", "model": {"source": "tiny-llama"},
        "calibration": {"data": "pydoc:calib", "samples": 4, "seq_len": 64},
        "steps": [{"sparsify_activations": {"sparsity": 0.6, "allocation": "uniform"}},
                  {"distill": {"rank": 4, "steps": 30, "lr": 0.01, "samples": 4, "seq_len": 64}}],
        "export": [{"format": "onnx", "name": "sparse"}, {"format": "onnx", "name": "fp32", "reference": True}],
        "check": {"runtime": "ort-cpu", "export": "sparse", "data": "pydoc:eval", "seq_len": 64, "windows": 2}})
    report = run_recipe(recipe, tmp_path, progress=False, bench=False)
    manifest = json.loads((tmp_path / "tiny-distill" / "sparse" / "manifest.json").read_text())
    step = manifest["steps"][1]
    assert step["step"] == "distill" and step["modules"][0]["distill"]["steps"] == 30
    assert step["modules"][0]["distill"]["kl_last_tenth"] < step["modules"][0]["distill"]["kl_first_tenth"]
    assert report["exports"]["sparse"]["op_counts"]["edgecompress::ActSparse"] == 2 * 4
    assert report["check"]["passed"] and report["check"]["activation_sparsity"] > 0.3
