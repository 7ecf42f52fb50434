"""Baked-in steering against numerical oracles on the tiny seeded Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgecompress.compress.calibration.observers import MeanObserver, RowsObserver
from edgecompress.compress.steer import (
    SteerConfig,
    added_to_stream,
    apply_steering,
    directions,
    pca_of_differences,
    project_out_cols,
    project_out_rows,
    search_strength,
    unit,
)
from edgecompress.errors import EdgeCompressError


def prompts(n: int, seed: int, lo: int = 0, hi: int = 130) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


POS, NEG = prompts(6, 1, 0, 130), prompts(6, 2, 130, 260)  # disjoint token ranges: the sets differ


def stream(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream: the embedding output, then the output of every block."""
    outs = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, o: outs.append(o))]
    hooks += [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
              for b in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def hidden_after_layer0(model, ids: torch.Tensor) -> np.ndarray:
    """Independent path: HF's output_hidden_states[1] is the output of block 0."""
    with torch.no_grad():
        return model(input_ids=ids[None], output_hidden_states=True).hidden_states[1][0].double().numpy()


# ----------------------------------------------------------------------------- directions


@pytest.mark.parametrize("position", ["last", "mean"])
def test_difference_of_means_equals_numpy_on_cached_activations(tiny_llama, position):
    acts = {name: [hidden_after_layer0(tiny_llama, p) for p in ps] for name, ps in (("pos", POS), ("neg", NEG))}
    pool = (lambda a: a[-1]) if position == "last" else (lambda a: a.mean(0))
    want = np.mean([pool(a) for a in acts["pos"]], 0) - np.mean([pool(a) for a in acts["neg"]], 0)
    got = directions(tiny_llama, POS, NEG, SteerConfig(layers=(0,), position=position, strength=1.0))[0]["v"]
    assert np.linalg.norm(want) > 0.02
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_pca_of_paired_differences_equals_numpy(tiny_llama):
    pos = np.stack([hidden_after_layer0(tiny_llama, p)[-1] for p in POS])
    neg = np.stack([hidden_after_layer0(tiny_llama, p)[-1] for p in NEG])
    d = pos - neg
    w, vecs = np.linalg.eigh(d.T @ d / len(d))
    u = vecs[:, -1] * np.sign((d @ vecs[:, -1]).mean())
    want = u * (d @ u).mean()
    got = directions(tiny_llama, POS, NEG, SteerConfig(layers=(0,), method="pca", strength=1.0))[0]["v"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-4)


def test_pca_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    u = unit(torch.randn(32, generator=g))
    base = torch.randn(40, 32, generator=g) * 3
    pos = base + 2.0 * u + 0.1 * torch.randn(40, 32, generator=g)
    neg = base + 0.1 * torch.randn(40, 32, generator=g)
    v = pca_of_differences(pos, neg)
    assert float(torch.dot(unit(v), u)) > 0.99
    assert float(v.norm()) == pytest.approx(2.0, rel=0.05)
    assert float(torch.dot(unit(pca_of_differences(neg, pos)), u)) < -0.99  # the sign follows the pairs


def test_mean_and_rows_observers_merge():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) for n in (3, 1, 4)]
    m, r = MeanObserver(), RowsObserver()
    for x in xs:
        m.update(x)
        r.update(x)
    flat = torch.cat(xs)
    assert torch.allclose(m.state()["mean"], flat.mean(0), atol=1e-6) and m.count == 8
    assert torch.equal(r.state()["rows"], flat)
    back = MeanObserver.from_state(m.state(), m.count).merge(MeanObserver.from_state(m.state(), m.count))
    assert torch.allclose(back.state()["mean"], flat.mean(0), atol=1e-6) and back.count == 16


# ----------------------------------------------------------------------------- baking


def test_bias_folding_equals_hooked_stream(tiny_llama):
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(5))
    cfg = SteerConfig(layers=(0, 1), strength=3.0)
    found = directions(tiny_llama, POS, NEG, cfg)
    hooked = copy.deepcopy(tiny_llama)
    with torch.no_grad(), added_to_stream(hooked, {i: 3.0 * found[i]["v"] for i in (0, 1)}):
        want = hooked(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        plain = hooked(input_ids=ids, use_cache=False).logits  # hooks removed
    records = apply_steering(tiny_llama, POS, NEG, cfg)
    with torch.no_grad():
        got = tiny_llama(input_ids=ids, use_cache=False).logits
    assert float((want - plain).abs().max()) > 1e-2  # the steering does change the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert tiny_llama.config.mlp_bias is True
    assert tiny_llama.model.layers[0].mlp.gate_proj.bias is None  # only the down projections got a bias
    assert [r["layer"] for r in records] == [0, 1] and records[0]["strength"] == 3.0
    assert records[0]["norm"] == pytest.approx(float(found[0]["v"].norm()), rel=1e-5)
    assert len(records[0]["direction"]) == 64


def test_ablation_leaves_no_component_in_the_residual_stream(tiny_llama):
    ids = torch.randint(0, 260, (1, 23), generator=torch.Generator().manual_seed(6))
    head_before = tiny_llama.lm_head.weight.detach().clone()
    u = unit(directions(tiny_llama, POS, NEG, SteerConfig(layers=(1,), mode="ablate"))[1]["v"])
    before = [float((h @ u).abs().max()) for h in stream(tiny_llama, ids)]
    records = apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(1,), mode="ablate"))
    after = stream(tiny_llama, ids)
    assert max(before) > 0.05  # there was something to remove
    for h in after:
        assert float((h @ u).abs().max()) < 1e-5 * max(1.0, float(h.abs().max()))
    # the tied head was untied and kept the original matrix
    assert records[0]["untied_lm_head"] is True and tiny_llama.config.tie_word_embeddings is False
    assert tiny_llama.lm_head.weight is not tiny_llama.model.embed_tokens.weight
    assert torch.equal(tiny_llama.lm_head.weight, head_before)


def test_clamp_fixes_the_component_after_every_layer(tiny_llama):
    ids = torch.randint(0, 260, (1, 19), generator=torch.Generator().manual_seed(7))
    cfg = SteerConfig(layers=(0,), mode="clamp", strength=0.5)
    records = apply_steering(tiny_llama, POS, NEG, cfg)
    u = torch.tensor(records[0]["direction"])
    c = records[0]["clamp_value"]
    assert c == pytest.approx(0.5 * records[0]["positive_component"]) and abs(c) > 1e-3
    for h in stream(tiny_llama, ids):
        torch.testing.assert_close(h @ u, torch.full(h.shape[:-1], c), atol=1e-5, rtol=1e-5)


def test_projections_are_orthogonal_oracles():
    g = torch.Generator().manual_seed(1)
    u = unit(torch.randn(16, generator=g))
    w, e, b = torch.randn(16, 24, generator=g), torch.randn(50, 16, generator=g), torch.randn(16, generator=g)
    assert float((u @ project_out_rows(w, u)).abs().max()) < 1e-5
    assert float((project_out_cols(e, u) @ u).abs().max()) < 1e-5
    assert float((u @ project_out_rows(b, u)).abs()) < 1e-5
    x = torch.randn(24, generator=g)
    ref = w @ x - torch.dot(u, w @ x) * u  # the stream write with its u-part removed
    torch.testing.assert_close(project_out_rows(w, u) @ x, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- strength


def test_search_finds_the_largest_strength_under_the_bound():
    a, trace = search_strength(lambda s: s * s, 5.0, 16.0, 12)
    assert 5**0.5 - 2.0 / 2**12 <= a <= 5**0.5 and len(trace) == 4 + 12  # 16, 8, 4, 2; then bisection
    assert max(t["strength"] for t in trace if t["kl"] <= 5.0) == a
    assert search_strength(lambda s: s, 100.0, 16.0, 3) == (16.0, [{"strength": 16.0, "kl": 16.0}])
    assert search_strength(lambda s: 1.0, 0.5, 16.0, 4)[0] == 0.0


def test_kl_bound_searches_and_reports(tiny_llama):
    neutral = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(8))
    records = apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(0,), kl_bound=0.02, max_strength=400.0,
                                                               search_steps=10), neutral)
    r = records[0]
    assert 0 < r["strength"] < 400.0 and r["neutral_kl"] <= 0.02 and len(r["search"]) > 6
    # a fixed strength over the bound is reported, naming the bound
    with pytest.raises(EdgeCompressError, match="kl_bound"):
        apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(0,), strength=400.0, kl_bound=1e-3), neutral)


def test_degenerate_strength_is_reported(tiny_llama):
    neutral = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(9))
    with pytest.raises(EdgeCompressError, match="no strength keeps KL"):
        apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(0,), kl_bound=1e-12, search_steps=2), neutral)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(tiny_llama):
    with pytest.raises(EdgeCompressError, match="empty prompt set"):
        apply_steering(tiny_llama, [], NEG, SteerConfig(layers=(0,), strength=1.0))
    with pytest.raises(EdgeCompressError, match="6 positive and 5 negative"):
        apply_steering(tiny_llama, POS, NEG[:5], SteerConfig(layers=(0,), method="pca", strength=1.0))
    with pytest.raises(EdgeCompressError, match=r"out of range; this model has 2 decoder layers \(0..1\)"):
        apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(2,), strength=1.0))
    with pytest.raises(EdgeCompressError, match="needs strength or kl_bound"):
        SteerConfig(layers=(0,))
    with pytest.raises(EdgeCompressError, match="reads one direction"):
        SteerConfig(layers=(0, 1), mode="ablate")
    tiny_llama.config.model_type = "gpt2"
    with pytest.raises(EdgeCompressError, match="llama"):
        apply_steering(tiny_llama, POS, NEG, SteerConfig(layers=(0,), strength=1.0))


def test_unequal_sets_are_fine_for_difference_of_means(tiny_llama):
    v = directions(tiny_llama, POS, NEG[:3], SteerConfig(layers=(0,), strength=1.0))[0]["v"]
    assert torch.isfinite(v).all() and float(v.norm()) > 0
