"""Structured layer pruning against oracles: the pruned model equals the unpruned one with the removed blocks /
sublayers replaced by identity (hooks on the untouched model, with and without KV cache); block influence equals
a NumPy reference; the greedy search equals a brute-force search over full forwards and its KL is <= block
influence's at the same count; the export has fewer ops, runs in ORT and the torch runtime like the pruned model;
bad input."""

import copy
import json
import textwrap

import numpy as np
import pytest
import torch

from edgecompress.compress.prune.apply import PruneLayersConfig, apply_prune_layers
from edgecompress.compress.prune.layers import RemovedSublayer, remove_sublayers
from edgecompress.compress.prune.scores import SublayerChain, block_influence, greedy_removal
from edgecompress.errors import RecipeError


@pytest.fixture
def llama6():
    """A seeded 6-layer tiny Llama (12 sublayers), tied embeddings, GQA 4/2, weights large enough to matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.15)  # sublayers that matter (KL ~ 0.1)
    return LlamaForCausalLM(cfg).eval()


def calib(n: int = 4, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 260, (n, t), generator=torch.Generator().manual_seed(seed))


def identity_hooks(model, removed: set[int]):
    """Hooks on the UNPRUNED model that make sublayer s (attention 2i, MLP 2i+1) add nothing; a layer with both
    gone returns its input. Independent of RemovedSublayer."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        if {2 * i, 2 * i + 1} <= removed:
            handles.append(layer.register_forward_hook(lambda m, args, kwargs, out: args[0], with_kwargs=True))
            continue
        if 2 * i in removed:
            handles.append(layer.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1])))
        if 2 * i + 1 in removed:
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    return handles


def kl_np(ref: np.ndarray, got: np.ndarray) -> float:
    def lsm(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    r, g = lsm(ref), lsm(got)
    return float((np.exp(r) * (r - g)).sum(-1).mean())


def full_kl(model, removed: list[int], ids: torch.Tensor, ref: np.ndarray) -> float:
    """KL of the model with ``removed`` cut out (a deep copy, full forward) from ``ref`` logits."""
    pruned = copy.deepcopy(model)
    remove_sublayers(pruned, removed)
    with torch.no_grad():
        return kl_np(ref, pruned(ids).logits.numpy())


REMOVALS = [{3}, {0}, {4, 5}, {0, 1, 6, 9, 11}, {2, 3, 4, 5, 7, 8, 10}]


@pytest.mark.parametrize("removed", REMOVALS)
def test_pruned_model_equals_identity_replacement(llama6, removed):
    ids = calib(2, 20)
    pruned = copy.deepcopy(llama6)
    rec = remove_sublayers(pruned, removed)
    blocks = sum(1 for i in range(6) if {2 * i, 2 * i + 1} <= removed)
    assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 6 - blocks == rec["layers"]
    assert sum(isinstance(m, RemovedSublayer) for m in pruned.modules()) == len(removed) - 2 * blocks
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in llama6.parameters())
    handles = identity_hooks(llama6, removed)
    try:
        with torch.no_grad():
            want, got = llama6(ids).logits, pruned(ids).logits
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
            # the KV cache (one entry per remaining attention layer) decodes like the oracle
            gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert pruned.generate(ids[:1, :8], **gen).tolist() == llama6.generate(ids[:1, :8], **gen).tolist()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # and the removal changed the model
        assert (llama6(ids).logits - got).abs().max() > 1e-3


def test_block_influence_equals_numpy(llama6):
    ids = calib()
    ins, outs, attn = {}, {}, {}

    def layer_hook(i):
        def hook(m, args, kwargs, out):
            ins[i], outs[i] = args[0].numpy(), out.numpy()
        return hook

    def attn_hook(i):
        def hook(m, args, out):
            attn[i] = out[0].numpy()
        return hook

    handles = [layer.register_forward_hook(layer_hook(i), with_kwargs=True)
               for i, layer in enumerate(llama6.model.layers)]
    handles += [layer.self_attn.register_forward_hook(attn_hook(i)) for i, layer in enumerate(llama6.model.layers)]
    with torch.no_grad():
        llama6(ids)
    for h in handles:
        h.remove()

    def bi(a, b):
        a, b = a.reshape(-1, 64).astype(np.float64), b.reshape(-1, 64).astype(np.float64)
        return 1 - float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean())

    chain = SublayerChain(llama6, ids)
    got = block_influence(chain, [(2 * i, 2 * i + 1) for i in range(6)] + [(2 * i,) for i in range(6)]
                          + [(2 * i + 1,) for i in range(6)])
    for i in range(6):
        mid = ins[i] + attn[i]
        assert got[(2 * i, 2 * i + 1)] == pytest.approx(bi(ins[i], outs[i]), abs=1e-5)
        assert got[(2 * i,)] == pytest.approx(bi(ins[i], mid), abs=1e-5)
        assert got[(2 * i + 1,)] == pytest.approx(bi(mid, outs[i]), abs=1e-5)


def test_greedy_equals_brute_force_and_beats_block_influence(llama6):
    ids = calib()
    with torch.no_grad():
        ref = llama6(ids).logits.numpy()
    units = [(s,) for s in range(12)]
    order = greedy_removal(SublayerChain(llama6, ids), units, 3)
    # oracle: each step is the argmin over full forwards of deep copies with one more sublayer removed
    chosen: list[int] = []
    for (unit, kl) in order:
        brute = {s: full_kl(llama6, chosen + [s], ids, ref) for s in range(12) if s not in chosen}
        best = min(brute, key=brute.get)
        assert unit == (best,) and kl == pytest.approx(brute[best], rel=1e-4)
        chosen.append(best)
    bi = block_influence(SublayerChain(llama6, ids), units)
    by_bi = sorted(range(12), key=lambda s: bi[(s,)])
    for k in (1, 2, 3):
        assert order[k - 1][1] <= full_kl(llama6, by_bi[:k], ids, ref) * (1 + 1e-5)
    assert order[2][1] < full_kl(llama6, by_bi[:3], ids, ref)  # strictly better here (the oracle can fail)
    # rescore=2 re-scores fewer units; its first pick is the exact one; block units remove whole layers
    assert greedy_removal(SublayerChain(llama6, ids), units, 3, rescore=2)[0] == order[0]
    (blk, kl_blk), = greedy_removal(SublayerChain(llama6, ids), [(2 * i, 2 * i + 1) for i in range(6)], 1)
    assert kl_blk == pytest.approx(min(full_kl(llama6, [2 * i, 2 * i + 1], ids, ref) for i in range(6)), rel=1e-4)


def test_js_and_stride(llama6):
    ids = calib()
    kl = greedy_removal(SublayerChain(llama6, ids), [(s,) for s in range(12)], 1)
    js = greedy_removal(SublayerChain(llama6, ids), [(s,) for s in range(12)], 1, divergence="js")
    assert 0 < js[0][1] < min(kl[0][1], np.log(2))
    half = greedy_removal(SublayerChain(llama6, ids, stride=2), [kl[0][0]], 1)
    with torch.no_grad():
        ref = llama6(ids).logits.numpy()[:, ::2]
        pruned = copy.deepcopy(llama6)
        remove_sublayers(pruned, list(kl[0][0]))
        want = kl_np(ref, pruned(ids).logits.numpy()[:, ::2])
    assert half[0][1] == pytest.approx(want, rel=1e-4)


def test_apply_records_keep_and_config(llama6):
    model = copy.deepcopy(llama6)
    cfg = PruneLayersConfig(method="block_influence", granularity="block", count=2, keep=(r"model\.layers\.[0-2]$",))
    records = apply_prune_layers(model, calib(), cfg)
    summary, *removed = records
    assert [r["module"] for r in removed] and all(int(r["module"].split(".")[2]) >= 3 for r in removed)
    assert summary["prune_layers"]["layers_after"] == 4 and len(summary["prune_layers"]["block_influence"]) == 6
    assert model.config.layer_pruning["layers"] == [i for i in range(6) if f"model.layers.{i}" not in
                                                    {r["module"] for r in removed}]
    # a second step composes: indices of the pruned model, original names recorded
    more = apply_prune_layers(model, calib(), PruneLayersConfig(method="given", remove=("model.layers.3.mlp",)))
    orig = model.config.layer_pruning["layers"]
    assert more[1]["original"] == [f"model.layers.{orig[3]}.mlp"] and model.config.layer_pruning["no_mlp"] == [3]


def test_bad_requests_are_clear_errors(llama6):
    ids = calib(2, 12)
    with pytest.raises(RecipeError, match="every decoder layer"):
        apply_prune_layers(copy.deepcopy(llama6), ids, PruneLayersConfig(method="greedy", count=12))
    with pytest.raises(RecipeError, match="every decoder layer"):
        apply_prune_layers(copy.deepcopy(llama6), ids, PruneLayersConfig(granularity="block", fraction=0.99))
    with pytest.raises(RecipeError, match="every decoder layer"):
        remove_sublayers(copy.deepcopy(llama6), range(12))
    with pytest.raises(RecipeError, match="every attention sublayer"):
        remove_sublayers(copy.deepcopy(llama6), range(0, 12, 2))
    with pytest.raises(RecipeError, match="only 2 of 6 are not protected"):
        apply_prune_layers(copy.deepcopy(llama6), ids, PruneLayersConfig(granularity="block", count=3,
                                                                          keep=(r"\.[0-3]$",)))
    with pytest.raises(RecipeError, match="no attention sublayer"):  # 6 of 12 is allowed, but not all attention
        apply_prune_layers(copy.deepcopy(llama6), ids, PruneLayersConfig(method="block_influence", count=6,
                                                                          keep=(r"mlp",)))
    with pytest.raises(RecipeError, match=r"'model.embed_tokens': the embedding cannot be removed.*6 decoder layers"):
        apply_prune_layers(copy.deepcopy(llama6), ids, PruneLayersConfig(
            method="given", remove=("model.embed_tokens", "model.layers.6")))
    with pytest.raises(RecipeError, match="Llama-family decoder"):
        apply_prune_layers(torch.nn.Linear(2, 2), ids, PruneLayersConfig(count=1))
    with pytest.raises(ValueError, match="exactly one of fraction, count"):
        PruneLayersConfig(fraction=0.2, count=2)


@pytest.mark.parametrize("body,needle", [
    ("{method: given, remove: [model.embed_tokens]}",
     "'model.embed_tokens' (the embedding) cannot be removed"),
    ("{method: given, remove: [lm_head]}", "(the LM head) cannot be removed"),
    ("{fraction: 0.2, count: 3}", "give exactly one of fraction, count"),
    ("{method: block_influence}", "give exactly one of fraction, count"),
    ("{fraction: 1.0}", "prune_layers.fraction: must be < 1.0"),
    ("{count: 2, remove: [model.layers.1]}", "remove is for method given"),
    ("{method: given}", "method given needs a non-empty remove list"),
    ("{count: 2, granularity: layer}", "'layer' is not one of 'sublayer', 'block'"),
    ("{count: 2, divergence: mse}", "'mse' is not one of 'kl', 'js'"),
    ("{count: 2, keep: ['(']}", "invalid regular expression"),
])
def test_recipe_errors_name_the_key(body, needle):
    from edgecompress.recipe import parse_recipe

    text = textwrap.dedent(f"""\
        name: x
        model: {{source: tiny-llama}}
        steps:
          - prune_layers: {body}
        export: [{{format: onnx}}]
        """)
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "x.yaml")
    assert needle in str(info.value) and "x.yaml line 4" in str(info.value), str(info.value)


@pytest.mark.parametrize("removed,fuse", [({0, 3, 4, 5, 10}, True), ({1, 2, 7}, False)])
def test_export_is_smaller_and_runs_like_the_pruned_model(llama6, tmp_path, removed, fuse):
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes import open_runtime

    pruned = copy.deepcopy(llama6)
    remove_sublayers(pruned, removed)
    (tmp_path / "full").mkdir()
    (tmp_path / "pruned").mkdir()
    full = export_causal_lm(llama6, tmp_path / "full", accuracy_level=0, fuse=fuse)
    body = export_causal_lm(pruned, tmp_path / "pruned", accuracy_level=0, fuse=fuse)
    load_model("tiny-llama").save_hf_files(tmp_path / "pruned", model=pruned)
    write_manifest(tmp_path / "pruned", {"task": "causal-lm", **body})
    attn, mlp = 6 - sum(s % 2 == 0 for s in removed), 6 - sum(s % 2 == 1 for s in removed)
    ops, full_ops = body["onnx"]["op_counts"], full["onnx"]["op_counts"]
    per_attn, per_mlp = (2, 2) if fuse else (4, 3)  # (q,k,v | qkv) + o ; (gate, up | gate_up) + down
    assert ops["com.microsoft::GroupQueryAttention"] == attn and ops.get("Split", 0) == (mlp if fuse else 0)
    assert ops["MatMul"] == full_ops["MatMul"] - per_attn * (6 - attn) - per_mlp * (6 - mlp)
    assert body["layer_pruning"]["kv_cache_layers"] == [i for i, m in enumerate(pruned.model.layers)
                                                        if not isinstance(m.self_attn, RemovedSublayer)]
    assert body["weights"]["weight_params"] < full["weights"]["weight_params"]
    art = Artifact.load(tmp_path / "pruned")
    assert {k: v for k, v in art.manifest["layer_pruning"].items() if k != "kv_cache_layers"} == \
        pruned.config.layer_pruning
    assert json.loads((art.path / "config.json").read_text())["layer_pruning"] == pruned.config.layer_pruning
    ids = calib(1, 20, seed=3)[0]
    with torch.no_grad():
        want = pruned(ids[None]).logits[0].numpy()
        gen = ids[:10].tolist()
        for _ in range(6):  # greedy decoding without a cache: the oracle of both runtimes' KV-cache loops
            gen.append(int(pruned(torch.tensor([gen])).logits[0, -1].argmax()))
        gen = gen[10:]
    for name in ("ort-cpu", "torch"):
        rt = open_runtime(name, art)
        np.testing.assert_allclose(rt.logits(ids.numpy()), want, atol=2e-4)
        assert rt.generate(ids[:10].tolist(), 6).tokens == gen, name


def test_recipe_prunes_quantizes_exports_and_checks(tmp_path):
    from edgecompress.artifact import Artifact
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import parse_recipe
    from edgecompress.runtimes import open_runtime

    text = textwrap.dedent("""\
        name: tiny-prune
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 32}
        steps:
          - prune_layers: {method: greedy, count: 1, divergence: js}
          - prune_mlp_channels: {fraction: 0.25, multiple_of: 32}
          - quantize: {method: rtn, bits: 4, group_size: 32, embeddings: false}
        export:
          - {format: onnx, name: pruned, accuracy_level: 0}
        check: {runtime: ort-cpu, seq_len: 32, windows: 2}
        """)
    report = run_recipe(parse_recipe(text), tmp_path, progress=False)
    art = Artifact.load(tmp_path / "tiny-prune" / "pruned")
    (step, channels, _) = art.manifest["steps"]
    summary, removed = step["modules"]
    assert {r["intermediate_after"] for r in channels["modules"]} == {96}  # of 128
    sizes = json.loads((art.path / "config.json").read_text())["layer_pruning"]["intermediate_sizes"]
    assert len(sizes) == 2 and {s for s in sizes if s} == {96}  # 0: a layer whose MLP prune_layers removed
    assert summary["prune_layers"]["removed"] == 1 and removed["score_kind"] == "js after removal"
    ops = report["exports"]["pruned"]["op_counts"]
    assert ops["com.microsoft::MatMulNBits"] == 8 - 2  # 2 layers x (qkv, o, gate_up, down), one sublayer's 2 gone
    ids = np.arange(5, 35, dtype=np.int64)
    np.testing.assert_allclose(open_runtime("ort-cpu", art).logits(ids), open_runtime("torch", art).logits(ids),
                               atol=1e-4)


@pytest.mark.parametrize("after", [
    "- awq: {bits: 4, group_size: 32}\n  - quantize: {method: rtn, bits: 4, group_size: 32, embeddings: false}",
    "- smoothquant: {alpha: 0.5}\n  - quantize: {preset: w8a8}",
    "- sparsify_activations: {method: teal, sparsity: 0.3}",
])
def test_later_steps_skip_removed_sublayers(tmp_path, after):
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import parse_recipe

    text = textwrap.dedent("""\
        name: t
        model: {source: tiny-llama}
        calibration: {samples: 4, seq_len: 32}
        steps:
          - prune_layers: {method: given, remove: [model.layers.0.self_attn, model.layers.1.mlp]}
          %s
        export: [{format: onnx, name: x, accuracy_level: 0}]
        check: {runtime: ort-cpu, seq_len: 32, windows: 2}
        """) % after
    report = run_recipe(parse_recipe(text), tmp_path, progress=False, bench=False)
    assert report["exports"]["x"]["op_counts"]["com.microsoft::GroupQueryAttention"] == 1
    assert report["check"]["perplexity_ratio"] < 1.1


def test_mlp_channel_pruning_equals_zeroed_channels_and_exports(llama6, tmp_path):
    from edgecompress.artifact import Artifact, write_manifest
    from edgecompress.compress.prune.channels import ChannelPruneConfig, apply_prune_channels
    from edgecompress.export.onnx_export import export_causal_lm
    from edgecompress.models import load_model
    from edgecompress.runtimes import open_runtime

    ids = calib()
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: acts.__setitem__(i, a[0].reshape(-1, 128).double())) for i, layer in
        enumerate(llama6.model.layers)]
    with torch.no_grad():
        llama6(ids)
    for h in hooks:
        h.remove()
    pruned = copy.deepcopy(llama6)
    remove_sublayers(pruned, [4])  # layer 2 has no attention; channel pruning composes with it
    records = apply_prune_channels(pruned, ids, ChannelPruneConfig(fraction=0.3, multiple_of=16))
    assert [r["intermediate_after"] for r in records] == [96] * 6  # round(0.7 * 128 / 16) * 16
    assert pruned.config.layer_pruning["intermediate_sizes"] == [96] * 6
    # oracle: the unpruned model with the dropped channels zeroed at down_proj's input, chosen by NumPy scores
    # (layer 2's scores come from the model without its attention, so compare the other layers' choices)
    for i in (0, 1):
        w = llama6.model.layers[i].mlp.down_proj.weight.double()
        score = (acts[i].square().mean(0) * w.detach().square().sum(0)).numpy()
        keep = np.sort(np.argsort(-score)[:96])
        np.testing.assert_array_equal(pruned.model.layers[i].mlp.gate_proj.weight.detach().numpy(),
                                      llama6.model.layers[i].mlp.gate_proj.weight.detach().numpy()[keep])
    masks = [torch.zeros(128) for _ in range(6)]
    for i, layer in enumerate(pruned.model.layers):
        g = llama6.model.layers[i].mlp.gate_proj.weight
        rows = [int((g == r).all(1).nonzero()[0]) for r in layer.mlp.gate_proj.weight]
        masks[i][rows] = 1.0
    oracle = copy.deepcopy(llama6)
    remove_sublayers(oracle, [4])
    for i, layer in enumerate(oracle.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: (a[0] * masks[i],))
    with torch.no_grad():
        np.testing.assert_allclose(pruned(ids).logits.numpy(), oracle(ids).logits.numpy(), atol=1e-5)
    (tmp_path / "a").mkdir()
    body = export_causal_lm(pruned, tmp_path / "a", accuracy_level=0)
    load_model("tiny-llama").save_hf_files(tmp_path / "a", model=pruned)
    write_manifest(tmp_path / "a", {"task": "causal-lm", **body})
    art = Artifact.load(tmp_path / "a")
    with torch.no_grad():
        want = pruned(ids[:1]).logits[0].numpy()
    for name in ("ort-cpu", "torch"):
        np.testing.assert_allclose(open_runtime(name, art).logits(ids[0].numpy()), want, atol=2e-4)
