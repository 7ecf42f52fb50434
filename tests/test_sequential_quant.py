"""GPTQ / AWQ / mixed precision applied to a whole (tiny) decoder, block by block."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edgecompress.compress.quant.awq import AWQConfig
from edgecompress.compress.quant.formats import QuantScheme
from edgecompress.compress.quant.gptq import GPTQConfig
from edgecompress.compress.quant.modules import QuantEmbedding, QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.quant.sequential import apply_awq, apply_gptq, stat_source
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe

SCHEME = QuantScheme(bits=4, block_size=16)


def _kl(ref, model, ids):
    with torch.no_grad():
        r = F.log_softmax(ref(input_ids=ids).logits, -1)
        q = F.log_softmax(model(input_ids=ids).logits, -1)
    return float((r.exp() * (r - q)).sum(-1).mean())


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 260, (16, 64), generator=g), torch.randint(0, 260, (4, 64), generator=g)


def test_stat_source_maps_shared_inputs():
    assert stat_source("model.layers.3.self_attn.v_proj") == "model.layers.3.self_attn.q_proj"
    assert stat_source("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_proj"
    assert stat_source("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"


def test_gptq_quantizes_every_matrix_and_beats_rtn(tiny_llama, data):
    calib, held_out = data
    gptq, rtn = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    records = apply_gptq(gptq, calib, SCHEME, GPTQConfig())
    apply_rtn(rtn, RTNConfig(bits=4, group_size=16))
    linears = [m for m in gptq.modules() if type(m) is torch.nn.Linear]
    assert not linears  # every projection and the head are packed
    assert isinstance(gptq.model.embed_tokens, QuantEmbedding) and isinstance(gptq.lm_head, QuantLinear)
    assert gptq.lm_head.packed is gptq.model.embed_tokens.packed  # tied: one tensor
    assert len(records) == 2 * 7 + 1 and all("gptq" in r for r in records)
    assert _kl(tiny_llama, gptq, held_out) < _kl(tiny_llama, rtn, held_out)


def test_gptq_float_targets_lower_the_error_against_the_float_model(tiny_llama, data):
    """Fitting each layer to the float model's outputs (GPTAQ) beats fitting its own drifted
    inputs, on held-out tokens, at 3 bits where the drift is large."""
    calib, held_out = data
    scheme = QuantScheme(bits=3, block_size=16)
    plain, fitted = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    apply_gptq(plain, calib, scheme, GPTQConfig(), embeddings=False)
    records = apply_gptq(fitted, calib, scheme, GPTQConfig(float_targets=1.0), embeddings=False)
    shifts = [r["gptq"]["float_target_shift"] for r in records if "layers" in r["module"]]
    assert len(shifts) == 14 and max(shifts[:4]) < 1e-5 < min(shifts[7:])  # block 0 sees the float inputs
    assert _kl(tiny_llama, fitted, held_out) < _kl(tiny_llama, plain, held_out)


def test_gptq_int8_rows_keep_the_most_used_tokens_at_int8(tiny_llama, data):
    """The head rows of the tokens the calibration windows use most are int8 (each row exactly GPTQ's
    int8 result, since GPTQ treats rows independently), the embedding shares the split table, and
    held-out error drops against the all-int4 head."""
    from edgecompress.compress.quant.formats import SplitRowsTensor
    from edgecompress.compress.quant.gptq import gptq_quantize

    calib, held_out = data
    calib = calib.clone()
    calib[:, ::4] = 7  # token 7 is the most used, then 11
    calib[:, 1::8] = 11
    plain, split = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    apply_gptq(plain, calib, SCHEME, GPTQConfig())
    records = apply_gptq(split, calib, SCHEME, GPTQConfig(), int8_rows=20)
    p = split.lm_head.packed
    assert isinstance(p, SplitRowsTensor) and split.model.embed_tokens.packed is p
    assert p.rows.numel() == 20 and {7, 11} <= set(p.rows.tolist()) and p.hi.bits == 8 and p.lo.bits == 4
    counts = torch.bincount(calib.reshape(-1), minlength=260)
    assert int(counts[p.rows].min()) >= int(counts[[v for v in range(260) if v not in set(p.rows.tolist())]].max())
    head = records[-1]
    share = float(counts[p.rows].sum() / counts.sum())
    assert head["int8_rows"] == {"count": 20, "calibration_token_share": round(share, 4)} and share > 0.375
    # each part is GPTQ of those rows alone on the head Hessian: the int4 rows equal the plain run's rows
    rest = [v for v in range(260) if v not in set(p.rows.tolist())]
    torch.testing.assert_close(p.to_float()[rest], plain.lm_head.packed.to_float()[rest])
    assert _kl(tiny_llama, split, held_out) < _kl(tiny_llama, plain, held_out)


def test_gptq_respects_a_per_layer_plan(tiny_llama, data):
    calib, _ = data
    plan = {"model.layers.0.mlp.down_proj": QuantScheme(bits=8, block_size=16)}
    apply_gptq(tiny_llama, calib, plan.get, GPTQConfig())
    assert tiny_llama.model.layers[0].mlp.down_proj.packed.bits == 8
    assert type(tiny_llama.model.layers[1].mlp.down_proj) is torch.nn.Linear  # not in the plan: untouched
    assert type(tiny_llama.lm_head) is torch.nn.Linear


def test_awq_keeps_the_model_float_and_equal_before_clipping(tiny_llama, data):
    calib, held_out = data
    model = copy.deepcopy(tiny_llama)
    records = apply_awq(model, calib, AWQConfig(scheme=SCHEME, clip=False))
    assert records and all(type(m) is not QuantLinear for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=held_out).logits, tiny_llama(input_ids=held_out).logits,
                                   atol=1e-4, rtol=1e-4)


def test_pipeline_runs_awq_gptq_and_mixed_precision_steps(tmp_path):
    recipe = parse_recipe(json.dumps({
        "name": "tiny-mixed",
        "model": {"source": "tiny-llama"},
        "calibration": {"samples": 4, "seq_len": 64},
        "steps": [
            {"awq": {"bits": 4, "group_size": 32}},
            {"mixed_precision": {"budget_bits": 5.0, "method": "gptq", "samples": 2,
                                 "candidates": [{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 32}]}},
        ],
        "export": [{"format": "onnx", "name": "mixed"}],
        "check": {"export": "mixed", "seq_len": 64, "windows": 2},
    }))
    report = run_recipe(recipe, tmp_path, progress=False)
    m = json.loads((tmp_path / "tiny-mixed" / "mixed" / "manifest.json").read_text())
    mixed = next(r["mixed_precision"] for s in m["steps"] for r in s["modules"] if "mixed_precision" in r)
    assert mixed["bits_per_weight"] <= 5.0
    assert 4.5 < report["exports"]["mixed"]["bits_per_weight"] <= 5.0 + 1e-6  # the artifact agrees with the plan
    assert {u["format"] for u in mixed["units"]} == {"int4-b32", "int8-b32"}
    assert report["check"]["passed"]


def test_pipeline_exports_int8_rows_and_float_targets_and_counts_every_byte(tmp_path):
    """The shipped W4 recipe's shape on the tiny model: down_proj first at g64, the rest at g32 with
    int8 head rows and float targets; the artifact's bits per weight is the packed tensors' own count,
    and the ORT check (and the torch runtime on the same artifact) passes."""
    from edgecompress.artifact import Artifact
    from edgecompress.runtimes.torch_ref import load_torch_model

    gptq = {"method": "gptq", "bits": 4, "act_order": True, "refit_scales": True, "float_targets": 0.25}
    recipe = parse_recipe(json.dumps({
        "name": "tiny-rows",
        "model": {"source": "tiny-llama"},
        "calibration": {"samples": 4, "seq_len": 64},
        "steps": [
            {"quantize": {**gptq, "group_size": 64, "targets": [r"mlp\.down_proj$"], "embeddings": False}},
            {"quantize": {**gptq, "group_size": 32, "int8_rows": 16}},
        ],
        "export": [{"format": "onnx", "name": "int4", "accuracy_level": 0}],
        "check": {"export": "int4", "seq_len": 64, "windows": 2},
    }))
    report = run_recipe(recipe, tmp_path, progress=False)
    art = tmp_path / "tiny-rows" / "int4"
    m = json.loads((art / "manifest.json").read_text())
    emb = next(f for f in m["layers"] if f["module"] == "model.embed_tokens")
    assert emb["onnx_op"] == "SplitRows:GatherBlockQuantized" and emb["format"].startswith("int8-b32-sym-rows16+")
    head = next(f for f in m["layers"] if f["module"] == "lm_head")
    assert head["onnx_op"] == "SplitRows:MatMulNBits" and head["stored_bytes"] == 0
    assert report["check"]["passed"]
    model = load_torch_model(Artifact.load(art))
    assert model.model.embed_tokens.weight.shape == (260, 64)


def test_gptq_3bit_beats_rtn_3bit_on_a_correlated_layer():
    from edgecompress.compress.quant.formats import quantize_blockwise
    from edgecompress.compress.quant.gptq import gptq_quantize, layer_error

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    H = X.T @ X / X.shape[0]
    W = torch.randn(48, 128, generator=g)
    scheme = QuantScheme(bits=3, block_size=32)
    packed, _ = gptq_quantize(W, H, scheme, GPTQConfig(act_order=True))
    rtn = quantize_blockwise(W, scheme)
    assert packed.qweight.shape == rtn.qweight.shape
    assert layer_error(W, packed.to_float(), H) < 0.8 * layer_error(W, rtn.to_float(), H)


def test_calibration_batch_size_reaches_the_steps(tmp_path, monkeypatch):
    """calibration.batch_size batches the sequential passes; the result agrees with batch size 1
    (GPTQ's rounding decisions shift with the Hessians' float summation order, hence rel=2%)."""
    import edgecompress.compress.quant.sequential as seq

    seen = []
    real = seq.sequential_calibrate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(seq, "sequential_calibrate", spy)
    results = []
    for bs in (1, 2):
        recipe = parse_recipe(json.dumps({
            "name": f"tiny-bs{bs}", "model": {"source": "tiny-llama"},
            "calibration": {"samples": 4, "seq_len": 64, "batch_size": bs},
            "steps": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
            "export": [{"format": "onnx", "name": "q"}],
            "check": {"export": "q", "seq_len": 64, "windows": 2, "runtime": "torch"},
        }))
        results.append(run_recipe(recipe, tmp_path, progress=False)["check"])
    assert seen == [1, 2]
    assert results[0]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=0.02)
