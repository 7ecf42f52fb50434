"""Recipes with SmoothQuant + W8A8 and fp4, through the whole pipeline on the tiny models."""

import json

import pytest

from edgecompress.cli import main

BERT_W8A8 = """\
name: tiny-bert-w8a8
model: {source: tiny-bert}
calibration: {samples: 16, seq_len: 64}
steps:
  - smoothquant: {alpha: 0.5}
  - quantize: {preset: w8a8, activations: {observer: %s}}
export:
  - {name: w8a8}
  - {name: fp32, reference: true}
check:
  export: w8a8
  seq_len: 64
  windows: 24
  thresholds: {cosine_mean: 0.9, cosine_worst: 0.5}
%s"""


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_encoder_w8a8_recipe_exports_checks_and_benches(tmp_path, observer):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BERT_W8A8 % (observer, "bench: {repeats: 1}\n" if observer == "minmax" else ""))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    run = tmp_path / "out" / "tiny-bert-w8a8"
    report = json.loads((run / "report.json").read_text())
    c = report["check"]
    assert c["passed"] and 0.9 <= c["cosine_mean"] <= 1.0 and c["sentences"] == 24
    if "bench" in report:
        assert report["bench"]["w8a8"]["sentences_s"] > 0 and report["bench"]["fp32"]["sentences_s"] > 0
    m = json.loads((run / "w8a8" / "manifest.json").read_text())
    assert m["onnx"]["op_counts"]["QuantizeLinear"] == 2 * 4  # qkv, o, ffn in, ffn out per layer
    acts = [r for s in m["steps"] for r in s["modules"] if "activation" in r]
    assert len(acts) == 2 * 6 and all(r["activation"]["method"] == observer for r in acts)
    assert m["steps"][0]["step"] == "smoothquant"
    assert {f["format"] for f in m["layers"][1:]} == {"int8-channel-sym-a8"}
    # check on its own, from the CLI
    assert main(["check", str(run / "w8a8"), "--json", "--windows", "8", "--seq-len", "32"]) == 0


def test_encoder_rejects_llm_thresholds(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((BERT_W8A8 % ("minmax", "")).replace("cosine_mean: 0.9, cosine_worst: 0.5", "perplexity_ratio: 1.1"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--no-bench"]) == 2
    err = capsys.readouterr().err
    assert "perplexity_ratio do not apply" in err and "cosine_mean" in err
    assert not (tmp_path / "out" / "tiny-bert-w8a8").exists()


LLAMA = """\
name: tiny-llama-x
model: {source: tiny-llama}
calibration: {samples: 4, seq_len: 64}
steps: %s
export: [{name: q}]
check: {seq_len: 64, windows: 2}
"""


def test_llama_w8a8_and_fp4_recipes_run_on_ort(tmp_path):
    for steps, op in [('[{smoothquant: {alpha: 0.6}}, {quantize: {preset: w8a8, activations: {observer: entropy}}}]',
                       "QuantizeLinear"),
                      ('[{quantize: {dtype: fp4, group_size: 32, embeddings: false}}]', "edgecompress::MatMulFP4")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(LLAMA % steps)
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--force"]) == 0
        report = json.loads((tmp_path / "out" / "tiny-llama-x" / "report.json").read_text())
        assert report["exports"]["q"]["op_counts"][op] >= 2 * 4
        assert report["check"]["perplexity_ratio"] < 1.2


@pytest.mark.parametrize("step,needle", [
    ("{quantize: {preset: w4a16, activations: {observer: mse}}}", "needs int8 per-channel weights"),
    ("{quantize: {preset: w8a8, activations: {observer: mse, granularity: channel}}}", "unknown key"),
    ("{quantize: {dtype: fp4, method: gptq, group_size: 32}}", "method: gptq, embeddings: true"),
    ("{smoothquant: {alpha: 1.5}}", "alpha"),
])
def test_bad_w8a8_and_fp4_steps_are_refused_with_the_fix(tmp_path, capsys, step, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LLAMA % f"[{step}]")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err


def test_gptq_on_an_encoder_is_refused_with_the_fix(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((BERT_W8A8 % ("minmax", "")).replace(
        "  - smoothquant: {alpha: 0.5}\n  - quantize: {preset: w8a8, activations: {observer: minmax}}",
        "  - quantize: {method: gptq, bits: 4, group_size: 32}"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--no-bench"]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "use method: rtn" in err
    assert not (tmp_path / "out" / "tiny-bert-w8a8").exists()
