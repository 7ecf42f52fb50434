"""Low-rank compensation against oracles: EoRA's weighted error <= SVD's (and equals the closed-form optimum),
SVD's Frobenius error <= EoRA's; the export (two extra MatMuls) equals the torch module; bad input."""

import copy
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecompress.compress.calibration.observers import HessianObserver
from edgecompress.compress.lowrank.apply import LowRankConfig, LowRankLinear, apply_lowrank
from edgecompress.compress.lowrank.eora import eora_lowrank, svd_lowrank, weighted_error
from edgecompress.compress.quant.formats import QuantScheme, quantize_blockwise
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.sparse.apply import SparsifyConfig, apply_sparsify, sparsify_weight
from edgecompress.compress.sparse.format import SparseLinear, SparseTensor
from edgecompress.errors import EdgeCompressError, RecipeError
from edgecompress.export.graph import FLOAT, GraphBuilder
from edgecompress.export.onnx_formats import EmitOptions, WeightCache, emit_linear


def activations(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    x[:, torch.randperm(k, generator=g)[:4]] *= 10.0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    obs = HessianObserver()
    obs.update(x)
    return obs.state()["hessian"]


def quant_error(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    wq = quantize_blockwise(w, QuantScheme(4, 32, True)).to_float()
    return w - wq, hessian(activations(4 * k, k, seed))


@pytest.mark.parametrize("n,k,rank", [(48, 96, 4), (64, 256, 16), (200, 72, 8), (30, 40, 30)])
def test_eora_beats_svd_on_the_covariance_and_svd_beats_eora_in_frobenius(n, k, rank):
    dW, H = quant_error(n, k)
    Be, Ae = eora_lowrank(dW, H, rank)
    Bs, As = svd_lowrank(dW, rank)
    e_eora, e_svd = weighted_error(dW - Be @ Ae, H), weighted_error(dW - Bs @ As, H)
    if rank < min(n, k):
        assert e_eora < 0.95 * e_svd, (e_eora, e_svd)
        assert (dW - Bs @ As).norm() < (dW - Be @ Ae).norm()
    assert e_eora <= e_svd * (1 + 1e-5) + 1e-9
    assert Be.shape == (n, rank) and Ae.shape == (rank, k)


@pytest.mark.parametrize("n,k,rank", [(48, 96, 4), (64, 256, 16)])
def test_eora_reaches_the_closed_form_optimum(n, k, rank):
    """Independent NumPy oracle: min tr(E H E^T) over rank-r corrections is the tail energy of dW H^(1/2)."""
    dW, H = quant_error(n, k)
    Hd = H.double().numpy()
    lam, Q = np.linalg.eigh(Hd)
    sqrt_h = (Q * np.sqrt(np.clip(lam, 0, None))) @ Q.T
    s = np.linalg.svd(dW.double().numpy() @ sqrt_h, compute_uv=False)
    optimum = float((s[rank:] ** 2).sum())
    B, A = eora_lowrank(dW, H, rank)
    assert weighted_error(dW - B @ A, H) == pytest.approx(optimum, rel=1e-4)
    assert weighted_error(dW, H) == pytest.approx(float((s**2).sum()), rel=1e-6)


def test_bad_ranks_are_refused(tiny_llama):
    dW, H = quant_error(16, 24)
    for r in (0, 17, 100):
        with pytest.raises(ValueError, match=r"= \[1, 16\]"):
            eora_lowrank(dW, H, r)
        with pytest.raises(ValueError, match="rank must be in"):
            svd_lowrank(dW, r)
    model, ref = copy.deepcopy(tiny_llama), tiny_llama
    apply_rtn(model, RTNConfig(bits=4, group_size=32, embeddings=False))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RecipeError, match="rank 65 exceeds") as info:  # k/v projections are [32, 64]
        apply_lowrank(model, ref, ids, LowRankConfig(rank=65))
    assert info.value.hint and not any(isinstance(m, LowRankLinear) for m in model.modules())
    with pytest.raises(RecipeError, match="rank 33 exceeds the smaller dimension of model.layers.0.self_attn.k_proj"):
        apply_lowrank(model, ref, ids, LowRankConfig(rank=33, method="svd"))
    with pytest.raises(RecipeError, match="no compressed"):
        apply_lowrank(copy.deepcopy(tiny_llama), ref, ids, LowRankConfig())


def test_lowrank_after_awq_is_refused(tiny_llama):
    from edgecompress.compress.quant.awq import AWQConfig
    from edgecompress.compress.quant.sequential import apply_awq

    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    apply_awq(model, ids, AWQConfig(scheme=QuantScheme(4, 32, True)))
    apply_rtn(model, RTNConfig(bits=4, group_size=32, embeddings=False))
    with pytest.raises(EdgeCompressError, match="awq"):
        apply_lowrank(model, tiny_llama, ids, LowRankConfig(method="svd"))


def _session(mod: nn.Module, k: int):
    g = GraphBuilder("t")
    x = g.input("x", FLOAT, ["m", k])
    y, fmt = emit_linear(g, x, mod, "layer", EmitOptions(accuracy_level=0), WeightCache())
    g.node("Identity", [y], outputs=["y"])
    g.output("y", FLOAT, None)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(g.model().SerializeToString(), so, providers=["CPUExecutionProvider"]), fmt


@pytest.mark.parametrize("kind", ["int4", "sparse", "int4-bias"])
def test_lowrank_export_equals_torch_module(kind):
    torch.manual_seed(0)
    n, k, r = 40, 96, 8
    lin = nn.Linear(k, n, bias=kind.endswith("bias"))
    if kind == "sparse":
        w, keep, _ = sparsify_weight(lin.weight.data, SparsifyConfig(method="magnitude", pattern="2:4"))
        base = SparseLinear(SparseTensor.from_dense(w.half().float(), keep), lin.bias, pattern="2:4")
    else:
        base = QuantLinear(quantize_blockwise(lin.weight, QuantScheme(4, 32, True)), lin.bias)
    A = (torch.randn(r, k) * 0.1).half().float()
    B = (torch.randn(n, r) * 0.1).half().float()
    mod = LowRankLinear(base, A, B, method="eora")
    sess, fmt = _session(mod, k)
    x = torch.randn(6, k)
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, mod(x).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mod(x).numpy(), (x @ mod.weight.T + (lin.bias if lin.bias is not None else 0)).numpy(),
                                   rtol=1e-4, atol=1e-5)
    assert fmt.format.endswith("+eora-r8") and {"lowrank_a", "lowrank_b"} <= set(fmt.initializers)
    base_bytes = _session(base, k)[1].stored_bytes
    assert fmt.stored_bytes == base_bytes + 2 * r * (n + k)  # fp16 factors


def test_lowrank_reduces_the_models_output_error_and_round_trips_through_the_artifact(tiny_llama, tmp_path):
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes.torch_ref import load_torch_model

    lm = load_model("tiny-llama")
    ref = copy.deepcopy(lm.model)
    ids = torch.randint(0, 260, (8, 64), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, 260, (2, 48), generator=torch.Generator().manual_seed(1))
    apply_sparsify(lm.model, ids, SparsifyConfig(method="wanda", pattern="2:4"))
    apply_rtn(lm.model, RTNConfig(bits=4, group_size=32, embeddings=False))

    def err(m):
        with torch.no_grad():
            return float((m(test_ids).logits - ref(test_ids).logits).square().mean())

    before = err(lm.model)
    svd = copy.deepcopy(lm.model)
    apply_lowrank(svd, ref, ids, LowRankConfig(method="svd", rank=8))
    recs = apply_lowrank(lm.model, ref, ids, LowRankConfig(method="eora", rank=8))
    assert len(recs) == 14 and all(r["output_error_after"] < r["output_error_before"] for r in recs)
    assert err(lm.model) < err(svd) < before
    body = export_causal_lm(lm.model, tmp_path, accuracy_level=0)
    lm.save_hf_files(tmp_path)
    write_manifest(tmp_path, {"task": "causal-lm", **body})
    decoded = load_torch_model(Artifact.load(tmp_path)).state_dict()
    for name, m in lm.model.named_modules():
        if isinstance(m, LowRankLinear):
            torch.testing.assert_close(decoded[f"{name}.weight"], m.dense_weight(), atol=1e-6, rtol=1e-5)


def test_lowrank_recipe_runs_end_to_end(tmp_path):
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import parse_recipe

    text = textwrap.dedent("""\
        name: tiny-eora
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 64}
        steps:
          - quantize: {bits: 4, group_size: 32, embeddings: false}
          - lowrank: {method: eora, rank: 4}
        export:
          - {format: onnx, name: w4, accuracy_level: 0}
        """)
    report = run_recipe(parse_recipe(text), tmp_path, progress=False)
    e = report["exports"]["w4"]
    assert set(e["params_by_format"]) == {"fp32", "int4-b32-sym+eora-r4"}
    assert e["op_counts"]["com.microsoft::MatMulNBits"] == 2 * 7  # unfused: q, k, v, o, gate, up, down
    assert e["op_counts"]["MatMul"] == 2 * 7 * 2 + 1  # two factor MatMuls per layer, and the tied head
