"""GPTQ W4 end to end on the real SmolLM2 with a small calibration set (runs in CI).

The shipped GPTQ recipe (int4 group 64 on every matrix, the tied embedding/head included:
4.25 bits per weight) on 8 x 256 calibration tokens, exported and checked on ORT CPU; on the
same held-out windows GPTQ must beat round-to-nearest with the same format.
"""

import copy

import pytest
from _e2e import baseline_check, run_small
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn

from edgecompress.models import load_model

pytestmark = pytest.mark.slow


def test_gptq_w4_artifact_beats_rtn_at_the_same_format(tmp_path):
    _, report = run_small("smollm2-135m-gptq-w4.yaml", tmp_path)
    gptq = report["check"]
    w = report["exports"]["int4"]
    assert w["bits_per_weight"] == pytest.approx(4.25, abs=0.01)  # int4 + fp16 scale per 64, head shared
    assert w["params_by_format"] == {"int4-b64-sym": w["weight_params"]}

    lm = load_model("smollm2-135m")
    rtn = copy.deepcopy(lm.model)
    apply_rtn(rtn, RTNConfig(bits=4, group_size=64, symmetric=True, embeddings=True))
    rtn_m = baseline_check(rtn, lm.model, lm.tokenizer)
    assert rtn_m["tokens"] == gptq["tokens"]
    assert gptq["perplexity_ratio"] < rtn_m["perplexity_ratio"] - 0.05, (gptq, rtn_m)
    assert gptq["kl"] < rtn_m["kl"]
