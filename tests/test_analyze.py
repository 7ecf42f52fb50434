"""`edgecompress analyze`: its numbers against direct computations on tiny-llama, its files, its errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edgecompress.analyze import AnalyzeConfig, analyze, write_report
from edgecompress.cli import main
from edgecompress.data import load_text, token_windows
from edgecompress.errors import EdgeCompressError
from edgecompress.models import load_model

pytest.importorskip("matplotlib")

CFG = AnalyzeConfig(samples=3, seq_len=48, influence_windows=2, sensitivity_windows=2)


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-llama")
    windows = token_windows(lm.tokenizer, load_text(CFG.data), CFG.seq_len, CFG.samples)
    return lm, windows, analyze(lm.model, lm.tokenizer, CFG)


def _inputs(model, name: str, windows: torch.Tensor) -> torch.Tensor:
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0].detach().reshape(-1)))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    h.remove()
    return torch.cat(got)


def test_activation_quantiles_match_the_captured_inputs(tiny):
    lm, windows, res = tiny
    site = res["activations"]["sites"]["mlp mid (down_proj)"]
    assert [b["block"] for b in site["blocks"]] == list(range(lm.model.config.num_hidden_layers))
    for b in site["blocks"]:
        x = _inputs(lm.model, f"model.layers.{b['block']}.mlp.down_proj", windows).abs().double()
        assert b["entries"] == x.numel() == windows.numel() * lm.model.config.intermediate_size
        for q in ("0.4", "0.5", "0.99"):
            exact = float(torch.quantile(x, float(q)))
            assert b["quantiles"][q] == pytest.approx(exact, rel=0.012)  # log bins: 2**(1/64) apart
        assert sum(b["hist"]) + b["below_range"] == pytest.approx(1.0, abs=1e-6)
    edges = res["activations"]["log2_edges"]
    assert len(edges) == len(site["blocks"][0]["hist"]) + 1


def test_block_influence_matches_the_block_inputs_and_outputs(tiny):
    lm, windows, res = tiny
    ins, outs = [], []
    layer = lm.model.model.layers[1]

    def hook(_m, args, kwargs, out):
        ins.append(kwargs.get("hidden_states", args[0] if args else None))
        outs.append(out[0] if isinstance(out, tuple) else out)

    h = layer.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        lm.model(input_ids=windows[: CFG.influence_windows])
    h.remove()
    exact = 1.0 - float(F.cosine_similarity(ins[0], outs[0], dim=-1).mean())
    got = next(r["score"] for r in res["influence"]["blocks"] if r["block"] == 1)
    assert got == pytest.approx(exact, rel=1e-4)
    names = [r["sublayer"] for r in res["influence"]["sublayers"]]
    assert len(names) == 2 * lm.model.config.num_hidden_layers and len(set(names)) == len(names)


def test_sensitivity_of_the_head_matches_a_direct_rtn(tiny):
    from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn

    lm, windows, res = tiny
    ref = lm.model
    q = copy.deepcopy(ref)
    apply_rtn(q, RTNConfig(bits=4, group_size=64, symmetric=True, targets=("embed_tokens",), embeddings=True))
    kl = 0.0
    with torch.no_grad():
        for w in windows[: CFG.sensitivity_windows]:
            r = F.log_softmax(ref(input_ids=w[None]).logits[0].float(), -1)
            p = F.log_softmax(q(input_ids=w[None]).logits[0].float(), -1)
            kl += float((r.exp() * (r - p)).sum(-1).mean())
    head = next(u for u in res["sensitivity"]["units"] if u["unit"] == "lm_head")
    assert head["kl"] == pytest.approx(kl / CFG.sensitivity_windows, rel=1e-3)
    assert head["kl"] > 0


def test_report_files(tiny, tmp_path):
    _, _, res = tiny
    files = write_report({"model": "tiny-llama", **res}, tmp_path)
    assert set(files) == {"activations.png", "influence.png", "sensitivity.png", "analysis.json", "index.html"}
    for f in files:
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "activations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((tmp_path / "analysis.json").read_text())
    assert back["influence"] == json.loads(json.dumps(res["influence"]))
    page = (tmp_path / "index.html").read_text()
    assert all(f'src="{f}"' in page for f in files if f.endswith(".png"))


def test_cli_writes_the_folder_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "an"
    args = ["analyze", "tiny-llama", "-o", str(out), "--samples", "2", "--seq-len", "32", "--no-sensitivity", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sensitivity"] is None and "sensitivity.png" not in summary["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_input(capsys):
    with pytest.raises(EdgeCompressError, match="samples must be >= 1"):
        AnalyzeConfig(samples=0)
    assert main(["analyze", "minilm-l6", "-o", "/tmp/never-written-analyze", "--no-sensitivity"]) == 2
    assert "analyze measures decoder LMs" in capsys.readouterr().err
    lm = load_model("tiny-llama")
    with pytest.raises(EdgeCompressError, match="needs a causal LM with a tokenizer"):
        analyze(lm.model, None, CFG)
