"""Mixed precision: units, exact bit accounting, budgeted assignment, sensitivity."""

import copy

import pytest
import torch

from edgecompress.compress.quant.formats import QuantScheme
from edgecompress.compress.quant.mixed import Unit, assign, find_units, measure_sensitivity, plan_mixed_precision, unit_bits
from edgecompress.errors import EdgeCompressError

W4 = QuantScheme(bits=4, block_size=16)
W8 = QuantScheme(bits=8, block_size=16)


def test_units_follow_the_exported_kernels(tiny_llama):
    units = find_units(tiny_llama)
    names = [u.name for u in units]
    assert names[:4] == ["model.layers.0.self_attn.qkv", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_up", "model.layers.0.mlp.down_proj"]
    head = units[-1]
    assert head.name == "lm_head" and head.modules == ["model.embed_tokens", "lm_head"]  # tied: one unit
    assert sum(u.params for u in units) == sum(p.numel() for n, p in tiny_llama.named_parameters()
                                               if p.dim() == 2 and "embed" not in n) + 260 * 64


def test_unit_bits_counts_codes_padding_scales_and_the_tied_tensor_once(tiny_llama):
    head = find_units(tiny_llama)[-1]
    assert unit_bits(tiny_llama, head, W4) == 260 * 64 * 4 + 260 * (64 // 16) * 16
    odd = QuantScheme(bits=4, block_size=128)  # 64 inputs in one padded block of 128
    assert unit_bits(tiny_llama, head, odd) == 260 * 128 * 4 + 260 * 16


def test_assign_prefers_sensitive_units_and_respects_the_budget():
    units = [Unit("a", ["a"], 100), Unit("b", ["b"], 100), Unit("c", ["c"], 100)]
    cost = {u.name: [400, 800] for u in units}  # 4 or 8 bits per weight
    sens = {"a": 0.1, "b": 0.5, "c": 0.01}
    choice, bpw = assign(units, sens, cost, budget_bits=16 / 3)  # room for exactly one upgrade
    assert choice == {"a": 0, "b": 1, "c": 0} and bpw == pytest.approx(16 / 3)
    choice, _ = assign(units, sens, cost, budget_bits=8)
    assert choice == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(EdgeCompressError, match="at least 4.0"):
        assign(units, sens, cost, budget_bits=3.5)


def test_sensitivity_is_positive_restores_the_model_and_is_stable_under_seed(tiny_llama):
    torch.manual_seed(0)
    windows = torch.randint(0, 260, (2, 32))
    before = copy.deepcopy(tiny_llama.state_dict())
    units = find_units(tiny_llama)
    s1 = measure_sensitivity(tiny_llama, windows, units, W4)
    assert all(v > 0 for v in s1.values())
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # float model restored
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    s2 = measure_sensitivity(tiny_llama, windows, units, W4)
    assert sorted(s1, key=s1.get) == sorted(s2, key=s2.get)


def test_plan_meets_budget(tiny_llama):
    torch.manual_seed(0)
    windows = torch.randint(0, 260, (2, 32))
    plan, report = plan_mixed_precision(tiny_llama, windows, [W4, W8], budget_bits=6.0)
    assert report["bits_per_weight"] <= 6.0
    assert {s.bits for s in plan.values()} == {4, 8}
    assert set(plan) == {m for u in find_units(tiny_llama) for m in u.modules}


def test_assign_starts_each_unit_at_its_own_cheapest_candidate():
    # candidates in rising precision (int4 b128, int4 b64, int8 b64); for "pad" the 128-blocks are padded,
    # so b128 is both dearer and coarser than b64: it starts at b64 and never "upgrades" to b128
    units = [Unit("even", ["even"], 100), Unit("pad", ["pad"], 100)]
    cost = {"even": [412, 425, 825], "pad": [458, 425, 825]}
    sens = {"even": 0.1, "pad": 0.2}
    choice, bpw = assign(units, sens, cost, budget_bits=4.185)  # the start: 837 bits
    assert choice == {"even": 0, "pad": 1} and bpw == pytest.approx(4.185)
    choice, bpw = assign(units, sens, cost, budget_bits=4.25)  # room for "even" -> b64, not "pad" -> b128
    assert choice == {"even": 1, "pad": 1} and bpw == pytest.approx(4.25)
    choice, bpw = assign(units, sens, cost, budget_bits=6.2)  # one int8 upgrade: the more sensitive unit
    assert choice == {"even": 0, "pad": 2} and bpw == pytest.approx((412 + 825) / 200)
