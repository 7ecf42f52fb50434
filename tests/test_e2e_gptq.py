"""GPTQ W4 end to end on the real SmolLM2 with a small calibration set (runs in CI).

The shipped GPTQ recipe (int4 group 64 on every matrix, the tied embedding/head included:
4.25 bits per weight) on 8 x 256 calibration tokens, exported and checked on ORT CPU; on the
same held-out windows GPTQ must beat round-to-nearest with the same format.
"""

import copy
import json
from pathlib import Path

import pytest
import yaml

from edgecompress.check import check_causal_lm
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.data import load_text, token_windows
from edgecompress.models import load_model
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-gptq-w4.yaml"


def test_gptq_w4_artifact_beats_rtn_at_the_same_format(tmp_path):
    spec = yaml.safe_load(RECIPE.read_text())
    spec["calibration"].update(samples=8, seq_len=256)
    spec["check"].update(windows=2, seq_len=256)
    spec["check"]["thresholds"] = {}
    spec["export"] = [spec["export"][0]]
    spec.pop("bench")
    report = run_recipe(parse_recipe(json.dumps(spec)), tmp_path, progress=False)
    gptq = report["check"]
    w = report["exports"]["int4"]
    assert w["bits_per_weight"] == pytest.approx(4.25, abs=0.01)  # int4 + fp16 scale per 64, head shared
    assert w["params_by_format"] == {"int4-b64-sym": w["weight_params"]}

    lm = load_model("smollm2-135m")
    rtn = copy.deepcopy(lm.model)
    apply_rtn(rtn, RTNConfig(bits=4, group_size=64, symmetric=True, embeddings=True))
    windows = token_windows(lm.tokenizer, load_text("pydoc:eval"), 256, 2, seed=0)

    def logits(ids):
        return rtn(input_ids=__import__("torch").as_tensor(ids)[None], use_cache=False).logits[0].detach().numpy()

    rtn_m = check_causal_lm(logits, lm.model, windows)
    assert rtn_m["tokens"] == gptq["tokens"]
    assert gptq["perplexity_ratio"] < rtn_m["perplexity_ratio"] - 0.05, (gptq, rtn_m)
    assert gptq["kl"] < rtn_m["kl"]
