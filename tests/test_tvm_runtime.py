"""The tvm-cpu runtime and the TVM artifact on the tiny Llama: recipe export, CLI, ORT equality, refusals.

One recipe run (``recipes/tiny-llama-tvm.yaml``: an int4 ONNX export at accuracy level 0 and
its TVM compilation) serves every test; two more compilations (``edgecompress export --to
tvm`` and the runtime's compile-on-first-use of an ONNX artifact) cover the other two ways a
library comes to be.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgecompress.artifact import Artifact, update_manifest
from edgecompress.cli import main
from edgecompress.errors import ArtifactError, EdgeCompressError
from edgecompress.runtimes import open_runtime

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama-tvm.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import load_recipe

    out = tmp_path_factory.mktemp("tvm-run")
    run_recipe(load_recipe(RECIPE), out, progress=False, bench=False)  # check on tvm-cpu included
    return out / "tiny-llama-tvm"


def test_recipe_writes_a_tvm_artifact_with_its_manifest(run_dir):
    tvm = pytest.importorskip("tvm")
    from edgecompress.export.tvm_kernels import host

    art = Artifact.load(run_dir / "int4-tvm")  # sha256 of every file verified
    assert art.format == "tvm"
    assert {"model.so", "params.safetensors", "config.json", "tokenizer.json"} <= set(art.manifest["files"])
    assert "model.onnx" not in art.manifest["files"]
    info = art.manifest["tvm"]
    assert info["tvm_version"] == tvm.__version__ and info["mcpu"] == host()["mcpu"]
    assert info["triple"] == host()["triple"] and info["target"]["kind"] == "llvm"
    assert info["compile_seconds"] > 0 and info["kv_cache"] == {"layers": 2, "kv_heads": 2, "head_dim": 16,
                                                                "max_positions": 512}
    assert art.manifest["onnx_source"]["op_counts"]["com.microsoft::MatMulNBits"] == 2 * 4 + 1
    assert art.manifest["weights"] == Artifact.load(run_dir / "int4").manifest["weights"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["check"]["runtime"] == "tvm-cpu" and report["check"]["passed"] is True
    assert report["check"]["top1_agreement"] > 0.99  # int4 vs fp32 on a random model: near-identical argmax


def test_tvm_logits_equal_ort_on_the_int4_artifact(run_dir):
    """The compiled library vs ONNX Runtime's MatMulNBits on the same int4 model (fp32 math both)."""
    ids = np.random.default_rng(1).integers(0, 256, 40)
    ort = open_runtime("ort-cpu", Artifact.load(run_dir / "int4")).logits(ids)
    tvm = open_runtime("tvm-cpu", Artifact.load(run_dir / "int4-tvm"), threads=2).logits(ids)
    assert tvm.shape == ort.shape == (40, 260)
    np.testing.assert_allclose(tvm, ort, atol=1e-4 * np.abs(ort).max())
    assert (tvm.argmax(-1) == ort.argmax(-1)).all()


def test_tvm_generate_equals_ort_greedy_tokens(run_dir):
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 256, 12)]
    ort = open_runtime("ort-cpu", Artifact.load(run_dir / "int4")).generate(prompt, 24)
    tvm = open_runtime("tvm-cpu", Artifact.load(run_dir / "int4-tvm"), threads=2).generate(prompt, 24)
    assert len(tvm.tokens) == 24 and tvm.prompt_tokens == 12
    assert tvm.tokens == ort.tokens
    assert tvm.decode_tok_s > 0 and tvm.prefill_tok_s > 0


@pytest.mark.parametrize("field,value,message", [
    ("tvm_version", "0.26.0", r"TVM 0\.26\.0 \(this process has TVM"),
    ("mcpu", "cortex-a76", r"CPU 'cortex-a76' \(this machine's CPU is"),
    ("triple", "aarch64-unknown-linux-gnu", r"aarch64-unknown-linux-gnu \(this machine is"),
])
def test_library_for_another_tvm_or_cpu_is_refused_before_loading(run_dir, tmp_path, field, value, message):
    dest = tmp_path / "other"
    shutil.copytree(run_dir / "int4-tvm", dest)
    art = Artifact.load(dest)
    update_manifest(dest, art.manifest, tvm={**art.manifest["tvm"], field: value})
    (dest / "model.so").write_bytes(b"not a library")  # loading it would fail differently
    with pytest.raises(ArtifactError, match=message) as e:
        open_runtime("tvm-cpu", Artifact.load(dest, verify=False))
    assert "not loading it" in str(e.value) and "--to tvm" in e.value.hint


def test_onnx_runtimes_refuse_a_tvm_artifact(run_dir):
    with pytest.raises(EdgeCompressError, match="compiled tvm artifact") as e:
        open_runtime("ort-cpu", Artifact.load(run_dir / "int4-tvm"))
    assert "tvm-cpu" in e.value.hint


def test_cli_check_and_bench_on_tvm_cpu(run_dir, capsys):
    assert main(["check", str(run_dir / "int4-tvm"), "--runtime", "tvm-cpu", "--json", "--seq-len", "32",
                 "--windows", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "tvm-cpu" and out["tokens"] == 31 and out["top1_agreement"] > 0.9
    assert main(["bench", str(run_dir / "int4-tvm"), "--runtime", "tvm-cpu", "--json", "--prompt-tokens", "16",
                 "--new-tokens", "4", "--repeats", "1"]) == 0
    tvm_keys = json.loads(capsys.readouterr().out)
    assert main(["bench", str(run_dir / "int4"), "--runtime", "ort-cpu", "--json", "--prompt-tokens", "16",
                 "--new-tokens", "4", "--repeats", "1"]) == 0
    ort_keys = json.loads(capsys.readouterr().out)
    assert set(tvm_keys) == set(ort_keys) and tvm_keys["decode_tok_s"] > 0


def test_cli_export_to_tvm_then_generate(run_dir, tmp_path, capsys):
    dest = tmp_path / "int4-tvm"
    assert main(["export", str(run_dir / "int4"), "--to", "tvm", "--target", "llvm", "-o", str(dest), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["artifact"] == str(run_dir / "int4") and info["compile_seconds"] > 0
    assert main(["generate", str(dest), "--runtime", "tvm-cpu", "--prompt", "Hello there", "--max-new-tokens", "6",
                 "--json"]) == 0
    tvm_tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["generate", str(run_dir / "int4"), "--prompt", "Hello there", "--max-new-tokens", "6",
                 "--json"]) == 0
    assert tvm_tokens == json.loads(capsys.readouterr().out)["tokens"]
    assert main(["export", str(run_dir / "int4"), "--to", "tvm", "-o", str(dest)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("target,message", [
    ("llvm -mcpu=znver3 -num-cores=2", "old target string.*not supported: -num-cores"),
    ("cuda", "is not one of"),
])
def test_cli_export_rejects_bad_targets(run_dir, tmp_path, capsys, target, message):
    assert main(["export", str(run_dir / "int4"), "--to", "tvm", "--target", target, "-o", str(tmp_path / "x")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err.replace("\n", " "))
    assert not (tmp_path / "x").exists()


def test_old_target_string_in_a_recipe_is_translated():
    from edgecompress.recipe import ExportSpec

    spec = ExportSpec.model_validate({"format": "tvm", "target": "llvm -mcpu=znver3"})
    assert (spec.target, spec.mcpu) == ("llvm", "znver3")
    assert ExportSpec.model_validate({"format": "tvm"}).target == "llvm"


def test_onnx_artifact_is_compiled_on_first_use_and_cached(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    art = Artifact.load(run_dir / "int4")
    first = open_runtime("tvm-cpu", art, threads=2)
    assert list((tmp_path / "tvm").glob("*/model.so"))
    import edgecompress.export.tvm as tvm_export

    monkeypatch.setattr(tvm_export, "build_decoder", lambda *a, **k: pytest.fail("compiled twice"))
    ids = np.arange(10)
    np.testing.assert_array_equal(open_runtime("tvm-cpu", art).logits(ids), first.logits(ids))


def test_an_edited_graph_does_not_reuse_the_cached_library(run_dir, tmp_path):
    """The cache key hashes the graph file itself, not only the manifest's record of it: a copy
    whose MatMulNBits switched accuracy level (0 <-> 4), loaded unverified, gets its own key."""
    import shutil

    import onnx

    from edgecompress.runtimes.tvm_cpu import _cache_key

    copy = tmp_path / "int4-edited"
    shutil.copytree(run_dir / "int4", copy)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i, changed = (4 if a.i == 0 else 0), changed + 1
    onnx.save(model, str(copy / "model.onnx"))
    assert changed
    assert _cache_key(Artifact.load(copy, verify=False)) != _cache_key(Artifact.load(run_dir / "int4"))
