"""End to end on the real bundled SmolLM2-135M (runs in CI; ~1-2 min on 2 cores).

The shipped recipe with a small calibration and evaluation budget: RTN int4 linears + int8
tied embedding, exported to ONNX (MatMulNBits / GatherBlockQuantized / GroupQueryAttention),
checked on ORT CPU against the uncompressed model on held-out text, benched side by side with
the fp32 export, and loaded by optimum's ORTModelForCausalLM, which must generate the same
greedy tokens as the toolkit's own runtime.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from edgecompress.artifact import Artifact
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe
from edgecompress.runtimes import open_runtime

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-int4.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = yaml.safe_load(RECIPE.read_text())
    spec["calibration"].update(samples=2, seq_len=128)
    spec["check"].update(windows=3, seq_len=256)
    spec["bench"].update(prompt_tokens=64, new_tokens=16, repeats=1)
    out = tmp_path_factory.mktemp("e2e")
    report = run_recipe(parse_recipe(json.dumps(spec)), out, progress=False)
    return out / spec["name"], report


def test_artifact_is_small_real_int4_and_passes_its_check(run):
    folder, report = run
    art = Artifact.load(folder / "int4")
    ops = art.manifest["onnx"]["op_counts"]
    assert ops["com.microsoft::MatMulNBits"] == 30 * 4 + 1  # fused qkv, o, gate_up, down per layer + head
    assert ops["com.microsoft::GatherBlockQuantized"] == 1
    assert ops["com.microsoft::GroupQueryAttention"] == 30
    assert "MatMul" not in ops  # no fp32 weight matmul left
    assert art.size_bytes < 90e6
    w = art.manifest["weights"]
    assert 4.5 < w["bits_per_weight"] < 5.5  # int4 + fp16 scales, int8 embedding/head (stored once)
    check = report["check"]
    assert check["passed"], check
    assert 1.0 < check["perplexity_ratio"] < 1.5 and check["top1_agreement"] > 0.65
    assert check["tokens"] == 3 * 255
    fp32 = report["exports"]["fp32"]
    assert fp32["bits_per_weight"] == 32.0 and fp32["size_mb"] > 500
    b = report["bench"]
    assert b["int4"]["decode_tok_s"] > 0 and b["fp32"]["decode_tok_s"] > 0
    assert b["int4"]["vs_fp32"]["size_mb"] < 0.2


def test_fp32_export_reproduces_the_reference_model(run):
    """The fp32 artifact on ORT equals the torch model it came from (perplexity ratio 1, top-1 1)."""
    from edgecompress.check import check_causal_lm
    from edgecompress.data import load_text, token_windows
    from edgecompress.models import load_model

    folder, _ = run
    lm = load_model("smollm2-135m")
    windows = token_windows(lm.tokenizer, load_text("pydoc:eval"), 128, 1, seed=0)
    rt = open_runtime("ort-cpu", Artifact.load(folder / "fp32"))
    m = check_causal_lm(rt.logits, lm.model, windows)
    assert m["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert m["top1_agreement"] > 0.99


def test_optimum_loads_the_artifact_and_generates_the_same_tokens(run):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, _ = run
    path = folder / "int4"
    art = Artifact.load(path)
    tok = art.tokenizer()
    ids = tok("The capital of France is")["input_ids"]
    ours = open_runtime("ort-cpu", art).generate(ids, 16).tokens
    model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, use_io_binding=False)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0, len(ids):].tolist() == ours
    assert "Paris" in tok.decode(ours)
