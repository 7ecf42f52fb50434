"""Calibration engine against numerical oracles: observers, driver, store, sequential pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from edgecompress.compress.calibration.driver import (
    StatRequest,
    calibrate,
    observe,
    sequential_calibrate,
)
from edgecompress.compress.calibration.observers import (
    OBSERVERS,
    HessianObserver,
    HistogramObserver,
    MeanSquareObserver,
    MinMaxObserver,
    rebin,
)
from edgecompress.compress.calibration.store import StatsStore, model_fingerprint
from edgecompress.errors import EdgeCompressError, RecipeError

LINEARS = r"model\.layers\.\d+\.(self_attn|mlp)\."
DOWN = "model.layers.0.mlp.down_proj"


def tiny_llama() -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_ids(n: int = 6, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 260, (n, t), generator=torch.Generator().manual_seed(1))


def batches(sizes=((2, 5), (7,), (1, 3), (4, 2)), c: int = 8, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(*s, c, generator=g) * scale * (i + 1) + i for i, s in enumerate(sizes)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ observers


def test_minmax_exact() -> None:
    xs = batches()
    obs = MinMaxObserver()
    for x in xs:
        obs.update(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).numpy()
    s = obs.state()
    assert obs.count == flat.shape[0] == 28
    np.testing.assert_array_equal(s["min"].numpy(), flat.min(0))
    np.testing.assert_array_equal(s["max"].numpy(), flat.max(0))
    np.testing.assert_array_equal(s["absmax"].numpy(), np.abs(flat).max(0))
    assert obs.tensor_absmax() == float(np.abs(flat).max())


def test_meansq_and_hessian_match_oracle() -> None:
    xs = batches()
    ms, hs = MeanSquareObserver(), HessianObserver()
    for x in xs:
        ms.update(x)
        hs.update(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    n = flat.shape[0]
    assert ms.count == hs.count == n
    assert rel(ms.state()["meansq"], (flat**2).mean(0)) < 1e-5
    assert rel(ms.state()["meanabs"], flat.abs().mean(0)) < 1e-5
    h = hs.state()["hessian"]
    assert h.dtype == torch.float32 and h.shape == (8, 8)
    assert rel(h, flat.T @ flat / n) < 1e-5


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_merge_and_from_state_equal_single_pass(name: str) -> None:
    xs = batches()
    whole, a, b = OBSERVERS[name](), OBSERVERS[name](), OBSERVERS[name]()
    for i, x in enumerate(xs):
        whole.update(x)
        (a if i % 2 else b).update(x)
    merged = type(a).from_state(a.state(), a.count).merge(type(b).from_state(b.state(), b.count))
    assert merged.count == whole.count
    if name == "histogram":  # different ranges: re-binned, total kept, quantiles within two bins
        assert merged.hist.sum() == pytest.approx(whole.hist.sum())
        for q in (0.1, 0.5, 0.9):
            assert abs(merged.quantile(q) - whole.quantile(q)) <= 2 * max(merged.bin_width, whole.bin_width)
        return
    if name == "rows":  # every row kept; merging changes only their order
        def key(t: torch.Tensor) -> torch.Tensor:
            return t[torch.argsort(t.sum(1))]
        assert torch.equal(key(merged.state()["rows"]), key(whole.state()["rows"]))
        return
    if name == "sample":  # each observer draws its own keys: a sample of the rows seen, not the same sample
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        got = merged.state()["rows"]
        assert got.shape[0] == min(512, rows.shape[0])
        assert all((rows == r).all(1).any() for r in got)
        return
    if name == "histogram_signed":
        from edgecompress.compress.quant.activation import percentile_range

        (mc, me), (wc, we) = merged.signed(), whole.signed()
        assert mc.sum() == pytest.approx(wc.sum())
        for p in (60.0, 90.0, 99.0):
            for got, want in zip(percentile_range(mc, me, p), percentile_range(wc, we, p)):
                assert abs(got - want) <= 2 * max(merged.bin_width, whole.bin_width)
        return
    for k, v in whole.state().items():
        assert rel(merged.state()[k], v) < 1e-5, k


def test_histogram_quantiles_within_one_bin() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, 16, generator=g) * s for s in (0.1, 1.0, 0.5, 7.0, 3.0)]  # range grows twice
    obs = HistogramObserver(bins=512)
    for x in xs:
        obs.update(x)
    a = torch.cat([x.reshape(-1) for x in xs]).abs().double().numpy()
    assert obs.hist.sum() == a.size and obs.upper >= a.max()
    for q in (0.05, 0.25, 0.5, 0.9, 0.99):
        assert abs(obs.quantile(q) - np.quantile(a, q)) <= obs.bin_width, q
    assert abs(obs.threshold_for_sparsity(0.4) - np.quantile(a, 0.4)) <= obs.bin_width
    assert obs.percentile(50) == obs.quantile(0.5)
    assert obs.quantile(0.0) == 0.0 and abs(obs.quantile(1.0) - a.max()) <= obs.bin_width


def test_rebin_keeps_total_and_mass_location() -> None:
    hist = np.array([4.0, 0.0, 2.0, 6.0])  # over [0, 4]
    new = rebin(hist, 4.0, 5.0)  # bins of 1.25: uniform mass inside each old bin
    assert new.sum() == pytest.approx(hist.sum())
    np.testing.assert_allclose(new, [4.0, 0.5 * 2.0, 0.5 * 2.0 + 0.75 * 6.0, 0.25 * 6.0])
    np.testing.assert_allclose(rebin(hist, 4.0, 8.0), [4.0, 8.0, 0.0, 0.0])


def test_histogram_zeros_then_values() -> None:
    obs = HistogramObserver(bins=8)
    obs.update(torch.zeros(3, 4))
    obs.update(torch.full((1, 4), 2.0))
    assert obs.hist.sum() == 16 and obs.hist[0] == 12 and obs.upper == 2.0
    assert obs.quantile(0.5) <= obs.bin_width


# ------------------------------------------------------------------ driver


def capture_inputs(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Independent oracle: record a module's inputs with a plain pre-hook."""
    got: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in got]).double()


def test_calibrate_hessian_matches_captured_input() -> None:
    model, ids = tiny_llama(), token_ids()
    requests = [StatRequest(r"down_proj$", "hessian"), StatRequest(r"\.q_proj$", "minmax", where="output")]
    store = calibrate(model, ids, requests, batch_size=4)
    x = capture_inputs(model, DOWN, ids)
    assert store.count(DOWN, "hessian") == x.shape[0] == ids.numel()
    assert rel(store.get(DOWN, "hessian")["hessian"], x.T @ x / x.shape[0]) < 1e-5
    assert store.modules("hessian") == [DOWN, "model.layers.1.mlp.down_proj"]
    assert store.has("model.layers.1.self_attn.q_proj", "minmax@output")
    assert hook_count(model) == 0


def test_calibrate_batching_and_iterables_agree() -> None:
    model, ids = tiny_llama(), token_ids()
    req = [StatRequest(LINEARS, "meansq"), StatRequest(r"up_proj", "hessian")]
    a = calibrate(model, ids, req)
    b = calibrate(model, [row for row in ids], req)
    c = calibrate(model, ids, req, batch_size=6, progress=True)
    for key in a.keys():
        for t, v in a.entries[key].items():
            assert rel(b.entries[key][t], v) < 1e-5 and rel(c.entries[key][t], v) < 1e-5
        assert a.counts[key] == b.counts[key] == c.counts[key]


def test_hooks_removed_when_forward_raises() -> None:
    model, ids = tiny_llama(), token_ids(2)

    def boom(m: nn.Module, batch: torch.Tensor) -> None:
        m(input_ids=batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, ids, [StatRequest(LINEARS, "hessian")], forward=boom)
    assert hook_count(model) == 0 and not model.training
    with pytest.raises(ValueError):
        with observe(model, [StatRequest(LINEARS, "minmax")]) as observers:
            assert len(observers) == 14 and hook_count(model) == 14
            raise ValueError
    assert hook_count(model) == 0


def test_bad_requests_are_clear_errors() -> None:
    model = tiny_llama()
    with pytest.raises(EdgeCompressError, match="matches no"):
        calibrate(model, token_ids(1), [StatRequest(r"no_such_module", "minmax")])
    with pytest.raises(RecipeError):
        StatRequest(".", "median")
    with pytest.raises(RecipeError):
        StatRequest("(", "minmax")


# ------------------------------------------------------------------ store


def full_store(model: nn.Module) -> StatsStore:
    reqs = [StatRequest(LINEARS, s) for s in OBSERVERS] + [StatRequest("o_proj", "histogram", where="output")]
    store = StatsStore(model_fingerprint(model), "data-fp")
    return calibrate(model, token_ids(3), reqs, store=store)


def test_store_round_trip(tmp_path) -> None:
    model = tiny_llama()
    store = full_store(model)
    store.save(tmp_path)
    back = StatsStore.load(tmp_path, model_fingerprint=model_fingerprint(model), data_fingerprint="data-fp")
    assert back is not None and back.keys() == store.keys() and back.counts == store.counts
    for key, tensors in store.entries.items():
        assert back.entries[key].keys() == tensors.keys()
        for t, v in tensors.items():
            assert torch.equal(back.entries[key][t], v)
    assert back.requests == store.requests and len(back.requests) == len(OBSERVERS) + 1
    hist = back.observer("model.layers.1.self_attn.o_proj", "histogram@output")
    assert hist.quantile(0.5) == store.observer("model.layers.1.self_attn.o_proj", "histogram@output").quantile(0.5)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format_version"] == 1 and len(meta["entries"]) == len(store)


def test_store_fingerprint_mismatch_and_missing(tmp_path) -> None:
    model = tiny_llama()
    full_store(model).save(tmp_path)
    assert StatsStore.load(tmp_path, data_fingerprint="other") is None
    assert StatsStore.load(tmp_path / "absent") is None
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert StatsStore.load(tmp_path, model_fingerprint=model_fingerprint(model)) is None
    assert model_fingerprint(tiny_llama()) == model_fingerprint(tiny_llama()) != model_fingerprint(model)


def test_store_corruption_is_a_clear_error(tmp_path) -> None:
    full_store(tiny_llama()).save(tmp_path)
    path = tmp_path / "stats.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(EdgeCompressError, match="stats.safetensors"):
        StatsStore.load(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(EdgeCompressError, match="meta.json"):
        StatsStore.load(tmp_path)


# ------------------------------------------------------------------ sequential


def assert_same_stats(a: StatsStore, b: StatsStore, keys) -> None:
    for key in keys:
        assert a.counts[key] == b.counts[key], key
        for t, v in b.entries[key].items():
            assert rel(a.entries[key][t], v) < 1e-5, (key, t)


def test_sequential_noop_equals_calibrate() -> None:
    model, ids = tiny_llama(), token_ids()
    reqs = [StatRequest(LINEARS, "hessian"), StatRequest(LINEARS, "meansq"), StatRequest("mlp", "minmax", "output")]
    calls = []
    seq = sequential_calibrate(
        model, ids, model.model.layers, reqs, lambda i, blk, st: calls.append((i, len(st))), batch_size=2
    )
    plain = calibrate(model, ids, reqs, batch_size=2)
    assert calls == [(0, 17), (1, 34)] and seq.keys() == plain.keys() and len(seq) == 34
    assert_same_stats(seq, plain, plain.keys())
    assert hook_count(model) == 0


def test_sequential_later_blocks_see_modified_earlier_blocks() -> None:
    ids = token_ids()
    reqs = [StatRequest(LINEARS, "hessian"), StatRequest(LINEARS, "minmax")]

    def zero_o_proj(i: int, block: nn.Module, store: StatsStore) -> None:
        assert store.has(f"model.layers.{i}.mlp.down_proj", "hessian")
        if i == 0:
            block.self_attn.o_proj.weight.data.zero_()

    model = tiny_llama()
    seq = sequential_calibrate(model, ids, model.model.layers, reqs, zero_o_proj)
    original = calibrate(tiny_llama(), ids, reqs)
    zeroed = tiny_llama()
    zeroed.model.layers[0].self_attn.o_proj.weight.data.zero_()
    oracle = calibrate(zeroed, ids, reqs)
    block0 = [k for k in seq.keys() if k[0].startswith("model.layers.0.")]
    block1 = [k for k in seq.keys() if k[0].startswith("model.layers.1.")]
    assert_same_stats(seq, original, block0)  # observed before on_block modified it
    assert_same_stats(seq, oracle, block1)
    q1 = ("model.layers.1.self_attn.q_proj", "hessian")
    assert rel(original.entries[q1]["hessian"], oracle.entries[q1]["hessian"]) > 1e-3  # the change is visible


def _captured_inputs(model: nn.Module, name: str, ids: torch.Tensor) -> np.ndarray:
    rows = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    handle.remove()
    return np.concatenate(rows)


def test_float_stream_cross_moment_matches_two_captured_models() -> None:
    """``cross`` of a block-1 module = mean over tokens of f x^T, f from the untouched model and x
    from the one whose block 0 on_block changed; for block 0 both streams agree (cross = hessian)."""
    ids = token_ids()
    reqs = [StatRequest(LINEARS, "hessian")]

    def scale_o_proj(i: int, block: nn.Module, store: StatsStore) -> None:
        if i == 0:
            block.self_attn.o_proj.weight.data.mul_(0.5)

    model = tiny_llama()
    seq = sequential_calibrate(model, ids, model.model.layers, reqs, scale_o_proj, float_stream=True)
    assert hook_count(model) == 0
    q0, d1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert rel(seq.get(q0, "cross")["cross"], seq.get(q0, "hessian")["hessian"]) < 1e-6
    f = _captured_inputs(tiny_llama(), d1, ids)
    x = _captured_inputs(model, d1, ids)
    oracle = f.T @ x / len(x)
    assert seq.count(d1, "cross") == len(x)
    assert rel(seq.get(d1, "cross")["cross"], torch.from_numpy(oracle)) < 1e-5
    assert rel(seq.get(d1, "hessian")["hessian"], torch.from_numpy(x.T @ x / len(x))) < 1e-5
    assert rel(torch.from_numpy(f), torch.from_numpy(x)) > 1e-2  # the streams really differ there


def test_sequential_rejects_modules_outside_blocks() -> None:
    model = tiny_llama()
    with pytest.raises(EdgeCompressError, match="lm_head"):
        sequential_calibrate(model, token_ids(1), model.model.layers, [StatRequest(".", "minmax")], lambda *a: None)
    assert hook_count(model) == 0
