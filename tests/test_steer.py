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
    _, vecs = np.linalg.eigh(d.T @ d / len(d))
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


# ----------------------------------------------------------------------------- recipe


def _steer_recipe(step: str) -> str:
    return f"name: s\nmodel:\n  source: tiny-llama\nsteps:\n  - steer: {step}\nexport:\n  - format: onnx\n"


def _steer_errors(step: str) -> str:
    from edgecompress.errors import RecipeError
    from edgecompress.recipe import parse_recipe

    with pytest.raises(RecipeError) as info:
        parse_recipe(_steer_recipe(step), "x.yaml")
    return str(info.value)


def test_steer_step_parses_with_defaults():
    from edgecompress.recipe import SteerStep, parse_recipe, recipe_to_dict

    r = parse_recipe(_steer_recipe("{pairs: builtin:concise-pairs, layers: 3, kl_bound: 0.1}"))
    s = r.steps[0]
    assert isinstance(s, SteerStep) and s.layers == (3,) and s.mode == "add" and s.method == "mean_diff"
    assert s.position == "last" and s.strength is None and s.chat is True
    assert parse_recipe(__import__("json").dumps(recipe_to_dict(r))) == r


@pytest.mark.parametrize("step, message", [
    ("{layers: [1], strength: 1.0}", "steps[0].steer.positive: missing prompt set"),
    ("{pairs: p.jsonl, positive: a.txt, negative: b.txt, layers: [1], strength: 1.0}",
     "steps[0].steer.pairs: give pairs, or positive and negative, not both"),
    ("{pairs: p.jsonl, layers: [1]}", "steps[0].steer.strength: mode add needs strength"),
    ("{pairs: p.jsonl, layers: [1, 2], mode: ablate}", "steps[0].steer.layers: ablate reads one direction"),
    ("{pairs: p.jsonl, layers: [1], mode: ablate, strength: 2.0}", "steps[0].steer.strength: ablate has no strength"),
    ("{pairs: p.jsonl, layers: [1], strength: 0.0}", "strength 0 does nothing"),
    ("{pairs: p.csv, layers: [1], strength: 1.0}", "steps[0].steer.pairs: 'p.csv' is not a prompt source"),
    ("{pairs: p.jsonl, layers: [-1], strength: 1.0}", "steps[0].steer.layers[0]: must be >= 0"),
    ("{pairs: p.jsonl, layers: [1], strength: 1.0, mode: steer}", "steps[0].steer.mode: 'steer' is not one of"),
    ("{pairs: p.jsonl, layer: [1], strength: 1.0}", "unknown key; valid keys: chat, eval_prompts"),
])
def test_steer_step_errors_name_the_key_and_fix(step, message):
    assert message in _steer_errors(step)


# ----------------------------------------------------------------------------- export


def _export(lm, path):
    from edgecompress.export.onnx_export import export_causal_lm

    from edgecompress.artifact import Artifact, write_manifest

    body = export_causal_lm(lm.model, path, accuracy_level=0)
    lm.save_hf_files(path, model=lm.model)
    write_manifest(path, {"task": "causal-lm", **body})
    return Artifact.load(path)


@pytest.mark.parametrize("mode", ["add", "ablate", "clamp"])
def test_exported_onnx_and_torch_runtime_equal_the_baked_model(tmp_path, mode):
    """ORT runs the baked artifact (bias as MatMul + Add; untied head) like the torch model; the
    torch runtime rebuilds it from config (mlp_bias, tie_word_embeddings) + initializers."""
    from edgecompress.runtimes import open_runtime

    from edgecompress.models import load_model

    lm = load_model("tiny-llama")
    strength = {"add": 4.0, "ablate": None, "clamp": 1.0}[mode]
    apply_steering(lm.model, POS, NEG, SteerConfig(layers=(1,), mode=mode, strength=strength))
    art = _export(lm, tmp_path)
    ops = art.manifest["onnx"]["op_counts"]
    ids = torch.randint(0, 260, (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lm.model(input_ids=ids, use_cache=False).logits[0].numpy()
    got = open_runtime("ort-cpu", art).logits(ids[0].numpy())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(open_runtime("torch", art).logits(ids[0].numpy()), want, atol=1e-4, rtol=0)
    config = art.config()
    if mode == "add":
        assert config.mlp_bias is True and "model.layers.1.mlp.down_proj.bias" in {
            i for layer in art.manifest["layers"] for i in layer["initializers"].values()}
        assert ops["Add"] >= 1
    else:
        assert config.tie_word_embeddings is False
        assert not getattr(config, "mlp_bias", False)
    # generation through the KV cache follows the same model
    gen = open_runtime("ort-cpu", art).generate(list(ids[0, :8].tolist()), 6)
    with torch.no_grad():
        ref = lm.model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                pad_token_id=3, eos_token_id=None)[0, 8:].tolist()
    assert gen.tokens == ref


def test_quantize_after_steer_keeps_the_bias(tmp_path):
    from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
    from edgecompress.runtimes import open_runtime

    from edgecompress.models import load_model

    lm = load_model("tiny-llama")
    apply_steering(lm.model, POS, NEG, SteerConfig(layers=(0,), strength=4.0))
    bias = lm.model.model.layers[0].mlp.down_proj.bias.detach().clone()
    apply_rtn(lm.model, RTNConfig(bits=4, group_size=32))
    assert torch.equal(lm.model.model.layers[0].mlp.down_proj.bias, bias)
    art = _export(lm, tmp_path)
    ids = torch.randint(0, 260, (1, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = lm.model(input_ids=ids, use_cache=False).logits[0].numpy()
    np.testing.assert_allclose(open_runtime("ort-cpu", art).logits(ids[0].numpy()), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- pipeline and CLI


def test_bundled_eval_prompts_are_disjoint_from_the_direction_prompts():
    from edgecompress.data import builtin_prompt_sets, load_prompt_pairs, load_prompts

    assert {"concise-pairs", "concise-eval", "concise-test", "concise-final", "concise-final2", "sentiment-pairs",
            "sentiment-eval", "sentiment-answers"} <= set(
        builtin_prompt_sets())
    for task in ("concise", "sentiment"):
        pos, neg = load_prompt_pairs(f"builtin:{task}-pairs")
        held_out = load_prompts(f"builtin:{task}-eval")
        assert len(pos) == len(neg) >= 16 and len(held_out) >= 16
        for q in held_out:
            assert not any(q.rstrip("?.") in p for p in pos + neg), q
    answers_pos, answers_neg = load_prompt_pairs("builtin:concise-answers")  # (question, answer) pairs
    assert len(answers_pos) >= 16 and all(isinstance(p, tuple) for p in answers_pos + answers_neg)
    for (q, whole), (q2, cut) in zip(answers_pos, answers_neg):
        assert q == q2 and whole.startswith(cut) and len(cut) < len(whole)  # a cut of the same answer
        assert not any(e.rstrip("?.") in q for e in load_prompts("builtin:concise-eval")), q
    # the second held-out set (never used to choose layers or strengths): disjoint from everything else
    # and the third and fourth (each written after the one before had been measured): disjoint from all of them
    others = load_prompts("builtin:concise-eval") + [q for q, _ in answers_pos] + list(
        load_prompt_pairs("builtin:concise-pairs")[0])
    for name in ("concise-test", "concise-final", "concise-final2"):
        test = load_prompts(f"builtin:{name}")
        assert len(test) >= 40 and len(set(test)) == len(test)
        for q in test:
            assert not any(q.rstrip("?.").lower() in o.lower() for o in others), q
        others += test
    joyful, gloomy = load_prompt_pairs("builtin:sentiment-answers")  # (neutral prompt, answer) pairs
    assert len(joyful) >= 16 and all(isinstance(p, tuple) for p in joyful + gloomy)
    topics = [p.split(". Be ")[0] + "." for p in load_prompt_pairs("builtin:sentiment-pairs")[0]]
    held_out = load_prompts("builtin:sentiment-eval")
    for (q, good), (q2, bad) in zip(joyful, gloomy):
        assert q == q2 and q in topics and good and bad and good != bad  # two answers to one neutral prompt
        assert "Be joyful" not in q and "Be gloomy" not in q
        assert not any(e.rstrip("?.") in q for e in held_out), q


def test_prompt_files_errors(tmp_path):
    from edgecompress.data import load_prompt_pairs, load_prompts
    from edgecompress.errors import DataError

    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"positive": "a"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: expected a JSON object with string fields positive, negative"):
        load_prompt_pairs(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="no bundled prompt set 'builtin:nope'"):
        load_prompts("builtin:nope")
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "q", "positive": "a", "negative": "b"}\n'
                                          '{"positive": "a", "negative": "b"}\n')
    with pytest.raises(DataError, match="some pairs have a \"prompt\" and some do not"):
        load_prompt_pairs(str(tmp_path / "mixed.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"prompt": 3, "positive": "a", "negative": "b"}\n')
    with pytest.raises(DataError, match="pair 1: \"prompt\" must be a string"):
        load_prompt_pairs(str(tmp_path / "num.jsonl"))


def test_answer_pairs_are_the_chat_prompt_followed_by_the_answer(tmp_path):
    """A pair with a "prompt" contrasts two answers to it: each item encodes as the chat-templated prompt
    (assistant turn open) followed by the answer's tokens, so position: last reads where the answer stops."""
    from edgecompress.data import encode_prompts, load_prompt_pairs
    from edgecompress.models import load_model

    tok = load_model("tiny-llama").tokenizer
    (tmp_path / "answers.jsonl").write_text('{"prompt": "Why is the sky blue?", "positive": "Rayleigh scattering.", '
                                            '"negative": "Sunlight is made of"}\n')
    pos, neg = load_prompt_pairs(str(tmp_path / "answers.jsonl"))
    assert pos == [("Why is the sky blue?", "Rayleigh scattering.")]
    assert neg == [("Why is the sky blue?", "Sunlight is made of")]
    for chat in (True, False) if getattr(tok, "chat_template", None) else (False,):
        head = (tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                        add_generation_prompt=True) if chat else tok("Why is the sky blue?")["input_ids"])
        (ids,) = encode_prompts(tok, pos, chat=chat)
        tail = tok("Rayleigh scattering.", add_special_tokens=False)["input_ids"]
        assert ids.tolist() == list(head) + list(tail)
        assert len(tail) > 0 and ids.tolist()[-len(tail):] != encode_prompts(tok, neg, chat=chat)[0].tolist()[-len(tail):]


def test_recipe_run_records_the_direction_and_steer_eval_reports(tmp_path, capsys):
    import json
    from pathlib import Path

    from edgecompress.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama-steer.yaml"
    assert main(["run", str(recipe), "-o", str(tmp_path), "--no-bench"]) == 0
    capsys.readouterr()
    art = tmp_path / "tiny-llama-steer" / "int4"
    m = json.loads((art / "manifest.json").read_text())
    steer, quant = m["steps"]
    assert steer["step"] == "steer" and quant["step"] == "quantize"
    (rec,) = steer["modules"]
    assert rec["layer"] == 1 and rec["mode"] == "add" and rec["method"] == "mean_diff" and rec["strength"] == 4.0
    assert rec["module"] == "model.layers.1.mlp.down_proj" and rec["norm"] > 0 and len(rec["direction"]) == 64
    assert rec["neutral_kl"] >= 0 and rec["prompts"] == {"positive": 32, "negative": 32}
    assert json.loads((art / "config.json").read_text())["mlp_bias"] is True
    assert json.loads((tmp_path / "tiny-llama-steer" / "fp32" / "config.json").read_text())["mlp_bias"] is False
    assert main(["steer-eval", str(art), "--limit", "2", "--max-new-tokens", "4", "--windows", "1",
                 "--seq-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("length_reduction", "mean_length", "reference_mean_length", "sentiment_shift", "lexicon_shift",
                "perplexity_ratio", "kl"):
        assert key in out, key
    assert out["prompts"] == 2 and out["prompts_source"] == "builtin:concise-eval" and out["kl"] > 0
    assert out["steer"][0]["strength"] == 4.0


def test_steer_eval_needs_prompts_when_the_artifact_names_none(tmp_path, capsys):
    from edgecompress.cli import main
    from edgecompress.models import load_model

    _export(load_model("tiny-llama"), tmp_path)
    assert main(["steer-eval", str(tmp_path), "--json"]) == 2
    assert "pass --prompts FILE" in capsys.readouterr().err


def test_pooled_requests_keep_the_store_key_of_unpooled_ones():
    from edgecompress.compress.calibration.driver import StatRequest
    from edgecompress.errors import RecipeError

    assert "tokens" not in StatRequest("x", "mean").to_dict()  # stores saved before pooling existed still match
    assert StatRequest("x", "mean", tokens="last").to_dict()["tokens"] == "last"
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(StatRequest("x", "rows", tokens="last").pool(x), x[:, -1])
    assert torch.equal(StatRequest("x", "rows", tokens="mean").pool(x), x.mean(1))
    with pytest.raises(RecipeError, match="tokens must be"):
        StatRequest("x", "mean", tokens="first")
