"""The float prefix of static W8A8 (PrefixQuant): calibration without the first token, the shipped
KV-cache prefix, and the runtimes that start from it."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgecompress.artifact import Artifact, write_manifest
from edgecompress.cli import main
from edgecompress.compress.calibration.driver import StatRequest
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.prefix import float_activations, logits_with_prefix, set_float_prefix
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn
from edgecompress.compress.quant.smoothquant import smoothquant_
from edgecompress.compress.quant.w8a8 import calibrate_activations
from edgecompress.errors import ArtifactError, EdgeCompressError
from edgecompress.export.onnx_export import export_causal_lm
from edgecompress.runtimes.ort_cpu import OrtCpuRuntime

from test_w8a8 import _calib_absmax

BOS = 1


def test_after_first_drops_each_sequences_first_token():
    x = torch.randn(3, 5, 4)
    req = StatRequest("x", "minmax", tokens="after_first")
    assert torch.equal(req.pool(x), x[:, 1:])
    assert req.to_dict()["tokens"] == "after_first"


def _w8a8_with_prefix(model, cal):
    smoothquant_(model, _calib_absmax(model, cal), alpha=0.5)  # as tests/test_w8a8.py: tames rounding cascades
    apply_rtn(model, RTNConfig(bits=8, group_size=0, symmetric=True, embeddings=False))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    record = set_float_prefix(model, cal, SimpleNamespace(bos_token_id=BOS))
    calibrate_activations(model, cal, names, method="minmax", tokens="after_first")
    return record


def test_ranges_leave_out_the_first_token(tiny_llama):
    torch.manual_seed(0)
    cal = torch.randint(4, 260, (4, 24))
    cal[:, 0] = BOS
    model = copy.deepcopy(tiny_llama)
    _w8a8_with_prefix(model, cal)
    q = model.model.layers[1].mlp.down_proj
    seen = []
    handle = q.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 1:]))
    with float_activations(model), torch.no_grad():
        model(cal)
    handle.remove()
    x = torch.cat(seen)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert float(q.act.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_prefix_artifact_on_ort_equals_torch_with_float_first_token(tiny_llama, tmp_path):
    torch.manual_seed(0)
    cal = torch.randint(4, 260, (4, 32))
    cal[:, 0] = BOS
    model = copy.deepcopy(tiny_llama)
    assert _w8a8_with_prefix(model, cal)["tokens"] == [BOS]
    body = export_causal_lm(model, tmp_path, accuracy_level=0)
    assert body["prefix"]["tokens"] == [BOS]
    write_manifest(tmp_path, {"task": "causal-lm", **body})
    rt = OrtCpuRuntime(Artifact.load(tmp_path), threads=1)
    assert rt.prefix is not None and rt.prefix.tokens == [BOS]

    ids = torch.randint(4, 260, (20,))
    ids[0] = BOS
    got = rt.logits(ids.numpy())
    want = logits_with_prefix(model, ids, [BOS]).numpy()
    assert got.shape == want.shape == (20, 260)
    np.testing.assert_allclose(got, want, atol=5e-3)
    assert np.mean(np.abs(got - want) < 1e-4) > 0.99
    # the first position is the float model's, not the quantized graph's
    with float_activations(model), torch.no_grad():
        np.testing.assert_allclose(got[0], model(ids[None, :1]).logits[0, 0].numpy(), atol=1e-5)
    # generation from the same prefix: the greedy tokens of the logits path
    gen = rt.generate(ids[:8].tolist(), 6)
    seq = ids[:8].tolist()
    for _ in range(6):
        seq.append(int(rt.logits(np.array(seq))[-1].argmax()))
    assert gen.tokens == seq[8:]
    # a prompt that is only the prefix starts decoding from the shipped logits
    assert rt.generate([BOS], 3).tokens[0] == int(rt.prefix.logits[-1].argmax())
    # the tvm-cpu runtime does not load prefixes: it refuses the artifact instead of ignoring it
    pytest.importorskip("tvm")
    from edgecompress.runtimes.tvm_cpu import TvmCpuRuntime

    with pytest.raises(ArtifactError, match="float prefix"):
        TvmCpuRuntime(Artifact.load(tmp_path))


def test_float_prefix_needs_bos_first(tiny_llama):
    cal = torch.randint(4, 260, (2, 16))
    with pytest.raises(EdgeCompressError, match="must start with the BOS token"):
        set_float_prefix(tiny_llama, cal, SimpleNamespace(bos_token_id=BOS))
    with pytest.raises(EdgeCompressError, match="a tokenizer with a BOS token"):
        set_float_prefix(tiny_llama, cal, SimpleNamespace(bos_token_id=None))


RECIPE = """\
name: tiny-llama-prefix
model: {source: tiny-llama}
calibration: {samples: 4, seq_len: 64}
steps:
  - smoothquant: {alpha: auto}
  - quantize: {preset: w8a8, activations: {observer: mse, float_prefix: true}}
export: [{name: q}]
check: {seq_len: 64, windows: 2, thresholds: {perplexity_ratio: 1.2}}
"""


def test_recipe_ships_the_prefix_and_checks_with_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--no-bench"]) == 0
    run = tmp_path / "out" / "tiny-llama-prefix"
    m = json.loads((run / "q" / "manifest.json").read_text())
    assert m["prefix"]["tokens"] == [BOS] and "prefix.safetensors" in m["files"]
    assert any("float_prefix" in r for r in m["steps"][1]["modules"])
    report = json.loads((run / "report.json").read_text())
    assert report["check"]["passed"] and report["check"]["perplexity_ratio"] < 1.2
