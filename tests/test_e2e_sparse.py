"""Wanda 2:4 end to end on the real SmolLM2 with a small calibration set (runs in CI).

The shipped recipe on 8 x 256 calibration tokens: every decoder projection pruned 2:4, exported as
``edgecompress::SparseMatMul`` (fp16 values + bitmask, 9 bits per weight), checked on ORT CPU; on
the same held-out windows Wanda must beat magnitude pruning with the same pattern by a wide margin.
"""

import copy
import json

import pytest
import torch
from _e2e import baseline_check, run_small
from edgecompress.compress.sparse.apply import SparsifyConfig, apply_sparsify

from edgecompress.models import load_model

pytestmark = pytest.mark.slow


def test_wanda_2of4_artifact_is_compressed_and_beats_magnitude(tmp_path):
    spec, report = run_small("smollm2-135m-wanda-2of4.yaml", tmp_path)
    wanda = report["check"]
    e = report["exports"]["sparse"]
    assert e["op_counts"]["edgecompress::SparseMatMul"] == 30 * 7
    layers = json.loads((tmp_path / spec["name"] / "sparse" / "manifest.json").read_text())["layers"]
    proj = [f for f in layers if f["module"].startswith("model.layers.")]
    assert all(f["format"] == "sparse-2:4-fp16" and f["bits"] == pytest.approx(9.0, abs=0.02) for f in proj)
    assert e["size_mb"] < 0.55 * 540  # the fp32 export is ~540 MB; the fp32 embedding (113 MB) is kept

    lm = load_model("smollm2-135m")
    magnitude = copy.deepcopy(lm.model)
    apply_sparsify(magnitude, torch.zeros(1, 8, dtype=torch.long), SparsifyConfig(method="magnitude", pattern="2:4"))
    mag = baseline_check(magnitude, lm.model, lm.tokenizer)
    assert mag["tokens"] == wanda["tokens"]
    assert wanda["perplexity_ratio"] < 0.5 * mag["perplexity_ratio"], (wanda, mag)
    assert wanda["kl"] < mag["kl"]
