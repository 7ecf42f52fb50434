"""Wanda 2:4 end to end on the real SmolLM2 with a small calibration set (runs in CI).

The shipped recipe on 8 x 256 calibration tokens: every decoder projection pruned 2:4, exported as
``edgecompress::SparseMatMul`` (fp16 values + bitmask, 9 bits per weight), checked on ORT CPU; on
the same held-out windows Wanda must beat magnitude pruning with the same pattern by a wide margin.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from edgecompress.check import check_causal_lm
from edgecompress.compress.sparse.apply import SparsifyConfig, apply_sparsify
from edgecompress.data import load_text, token_windows
from edgecompress.models import load_model
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-wanda-2of4.yaml"


def test_wanda_2of4_artifact_is_compressed_and_beats_magnitude(tmp_path):
    spec = yaml.safe_load(RECIPE.read_text())
    spec["calibration"].update(samples=8, seq_len=256)
    spec["check"].update(windows=2, seq_len=256)
    spec["check"]["thresholds"] = {}
    spec["export"] = [spec["export"][0]]
    spec.pop("bench")
    report = run_recipe(parse_recipe(json.dumps(spec)), tmp_path, progress=False)
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
    windows = token_windows(lm.tokenizer, load_text("pydoc:eval"), 256, 2, seed=0)

    def logits(ids):
        with torch.no_grad():
            return magnitude(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0].numpy()

    mag = check_causal_lm(logits, lm.model, windows)
    assert mag["tokens"] == wanda["tokens"]
    assert wanda["perplexity_ratio"] < 0.5 * mag["perplexity_ratio"], (wanda, mag)
    assert wanda["kl"] < mag["kl"]
