"""AWQ (scale search, clip search, exact folding) against activation-level oracles on seeded data."""

import copy
import logging

import pytest
import torch
from edgecompress.compress.calibration.driver import StatRequest, calibrate
from edgecompress.compress.quant.awq import (
    AWQConfig,
    apply_clip,
    awq_block_,
    awq_search_clip,
    awq_search_scales,
    block_error,
    fold_scales_into_linear,
    fold_scales_into_norm,
    rescale_stats,
)
from edgecompress.compress.quant.formats import (
    QuantScheme,
    quantize_blockwise,
    to_blocks,
)
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn

log = logging.getLogger(__name__)
OUTLIERS = [3, 17, 40, 58]


def _random_scales(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.rand(k, generator=g) * 2 - 1)  # in [1/e, e]


def _fold_layer0(model, seed: int = 1) -> dict[str, torch.Tensor]:
    layer = model.model.layers[0]
    s = {"qkv": _random_scales(64, seed), "mlp": _random_scales(64, seed + 1), "down": _random_scales(128, seed + 2)}
    attn, mlp = layer.self_attn, layer.mlp
    fold_scales_into_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s["qkv"])
    fold_scales_into_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s["mlp"])
    fold_scales_into_linear(mlp.up_proj, mlp.down_proj, s["down"])
    return s


def _inputs(model, ids, modules: dict[str, str]) -> dict[str, torch.Tensor]:
    """Input rows [tokens, K] of the named submodules during one forward."""
    got: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = [model.get_submodule(path).register_forward_hook(
        lambda _m, args, _o, k=k: got[k].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for k, path in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def test_folding_is_exact(tiny_llama):
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids).logits
    _fold_layer0(tiny_llama)
    with torch.no_grad():
        out = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_statistic_transform_matches_measured(tiny_llama):
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    where = {"qkv": "model.layers.0.self_attn.q_proj", "mlp": "model.layers.0.mlp.gate_proj",
             "down": "model.layers.0.mlp.down_proj"}
    before = _inputs(tiny_llama, ids, where)
    s = _fold_layer0(tiny_llama)
    after = _inputs(tiny_llama, ids, where)
    for key, x in before.items():
        entry = {"hessian": x.T @ x / len(x), "meansq": x.square().mean(0), "meanabs": x.abs().mean(0)}
        pred = rescale_stats(entry, s[key])
        y = after[key]
        measured = {"hessian": y.T @ y / len(y), "meansq": y.square().mean(0), "meanabs": y.abs().mean(0)}
        for stat, m in measured.items():
            rel = float((pred[stat] - m).norm() / m.norm())
            assert rel < 1e-4, (key, stat, rel)


def _outlier_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 64, generator=g)
    X[:, OUTLIERS] *= 20.0
    Ws = [torch.randn(48, 64, generator=g) * 0.05, torch.randn(32, 64, generator=g) * 0.05]
    return X, Ws


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, block_size=16), QuantScheme(bits=4, block_size=0),
                                    QuantScheme(bits=4, block_size=32, symmetric=False)])
def test_search_scales_beats_rtn_on_outlier_channels(scheme):
    X, Ws = _outlier_layer()
    H = X.T @ X / len(X)
    s, info = awq_search_scales(Ws, H, X.abs().mean(0), scheme, grid=20)
    assert s.shape == (64,) and s.dtype == torch.float32 and bool((s > 0).all())

    def act_loss(scales: torch.Tensor) -> float:  # oracle on the activations themselves: x/s through Q(W s)
        err = sum(((X / scales) @ quantize_blockwise(W * scales, scheme).to_float().T - X @ W.T).square().sum()
                  for W in Ws)
        return float(err) / len(X)

    assert info["loss_rtn"] == pytest.approx(act_loss(torch.ones(64)), rel=1e-3)
    assert info["loss"] == pytest.approx(act_loss(s), rel=1e-3)
    assert info["loss"] <= info["loss_rtn"]
    assert info["loss"] < 0.8 * info["loss_rtn"], info
    assert float(s[OUTLIERS].min()) > float(s.median())  # salient channels are scaled up
    log.info("AWQ scale search %s: alpha %.2f, loss AWQ/RTN = %.3f", scheme, info["alpha"],
             info["loss"] / info["loss_rtn"])


def _heavy_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g).pow(-0.5)  # heavy tails


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, block_size=16), QuantScheme(bits=4, block_size=0),
                                    QuantScheme(bits=4, block_size=16, symmetric=False),
                                    QuantScheme(bits=8, block_size=32)])
def test_search_clip_is_optimal_on_its_grid(scheme):
    W = _heavy_weight(24, 64)
    d = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.1
    r = awq_search_clip(W, d, scheme, grid=20, max_shrink=0.5)
    n_blocks = to_blocks(W, scheme.block_size).shape[1]
    assert r.shape == (24, n_blocks)
    assert bool(((r >= 0.5 - 1e-6) & (r <= 1.0)).all())

    def err(clip) -> torch.Tensor:  # oracle: the packed format's own dequantization
        e = (quantize_blockwise(W, scheme, clip=clip).to_float() - W).square() * d
        return to_blocks(e, scheme.block_size).sum(-1)

    found = err(r)
    assert bool((found <= err(1.0) * (1 + 1e-6)).all())
    best_on_grid = torch.stack([err(c) for c in torch.linspace(1.0, 0.5, 20).tolist()]).amin(0)
    torch.testing.assert_close(found, best_on_grid, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(block_error(W, d, scheme, r), found, rtol=1e-5, atol=1e-9)
    if scheme.bits == 4:
        assert float(found.sum()) < 0.97 * float(err(1.0).sum())  # heavy tails: clipping pays


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, block_size=16), QuantScheme(bits=4, block_size=0),
                                    QuantScheme(bits=8, block_size=32),
                                    QuantScheme(bits=4, block_size=16, scale_dtype="float32")])
def test_apply_clip_then_rtn_equals_clipped_rtn_symmetric(scheme):
    W = _heavy_weight(24, 72, seed=2)  # 72: a padded last block when block_size=16/32
    n_blocks = to_blocks(W, scheme.block_size).shape[1]
    r = torch.linspace(1.0, 0.5, 20)[torch.randint(0, 20, (24, n_blocks), generator=torch.Generator().manual_seed(3))]
    Wc = W.clone()
    apply_clip(Wc, r, scheme)
    a, b = quantize_blockwise(Wc, scheme), quantize_blockwise(W, scheme, clip=r)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.to_float(), b.to_float())
    Wone = W.clone()
    apply_clip(Wone, torch.ones(24, n_blocks), scheme)
    assert torch.equal(Wone, W)  # ratio 1 changes nothing (no exact peak ties in random data)


def test_apply_clip_asymmetric_keeps_grid_and_unclamped_codes():
    scheme = QuantScheme(bits=4, block_size=16, symmetric=False)
    W = _heavy_weight(24, 64, seed=4)
    r = torch.linspace(1.0, 0.5, 20)[torch.randint(0, 20, (24, 4), generator=torch.Generator().manual_seed(5))]
    Wc = W.clone()
    apply_clip(Wc, r, scheme)
    a, b = quantize_blockwise(Wc, scheme), quantize_blockwise(W, scheme, clip=r)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zero_points, b.zero_points)
    qa, qb = a.unpacked().int(), b.unpacked().int()
    kept = Wc == W
    assert torch.equal(qa[kept], qb[kept])
    # a clamped entry at the upper bound may land one code below (never above) the clip-quantized one
    assert set((qa - qb)[~kept].unique().tolist()) <= {-1, 0}
    assert float((kept.logical_not()).float().mean()) > 0.05  # the test did clamp something


def _layer0_output(model, ids) -> torch.Tensor:
    out = []
    h = model.model.layers[0].register_forward_hook(lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return out[0]


def test_awq_block_on_tiny_llama(tiny_llama):
    model = tiny_llama
    with torch.no_grad():  # a few large-magnitude residual channels, as in real LLMs
        model.model.embed_tokens.weight[:, OUTLIERS] *= 20.0
    gen = torch.Generator().manual_seed(1)
    calib, held = torch.randint(0, 260, (8, 32), generator=gen), torch.randint(0, 260, (4, 32), generator=gen)
    store = calibrate(model, calib, [StatRequest(r"layers\.0\.", "hessian"), StatRequest(r"layers\.0\.", "meansq")],
                      batch_size=4)
    scheme = QuantScheme(bits=4, block_size=16)
    rtn = RTNConfig(bits=4, group_size=16, embeddings=False, targets=(r"layers\.0\.",))
    with torch.no_grad():
        ref_logits = model(input_ids=held).logits
    ref = _layer0_output(model, held)

    def mse(m) -> float:
        return float((_layer0_output(m, held) - ref).square().mean())

    scaled = copy.deepcopy(model)
    recs = awq_block_(scaled.model.layers[0], store.get, "model.layers.0", AWQConfig(scheme, clip=False))
    assert [r["step"] for r in recs] == ["awq_scale"] * 3
    assert all(r["loss_after"] <= r["loss_before"] for r in recs)
    with torch.no_grad():
        torch.testing.assert_close(scaled(input_ids=held).logits, ref_logits, rtol=1e-5, atol=1e-5)

    clipped = copy.deepcopy(model)
    recs = awq_block_(clipped.model.layers[0], store.get, "model.layers.0", AWQConfig(scheme))
    clip_recs = [r for r in recs if r["step"] == "awq_clip"]
    assert len(clip_recs) == 7 and all(0.5 <= r["mean_clip"] <= 1.0 for r in clip_recs)
    assert all(r["loss_after"] <= r["loss_before"] for r in clip_recs)

    plain = copy.deepcopy(model)
    for m in (plain, scaled, clipped):
        apply_rtn(m, rtn)
    e_rtn, e_scale, e_awq = mse(plain), mse(scaled), mse(clipped)
    log.info("layer-0 output MSE: RTN %.4g, AWQ scale %.4g (x%.3f), AWQ scale+clip %.4g (x%.3f)",
             e_rtn, e_scale, e_scale / e_rtn, e_awq, e_awq / e_rtn)
    assert e_scale < e_rtn
    assert e_awq < e_rtn
