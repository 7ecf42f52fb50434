"""The CLI and pipeline end to end on the tiny Llama, and every bad-input path."""

import json
import shutil
from pathlib import Path

import pytest

from edgecompress.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama-int4.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(["run", str(RECIPE), "-o", str(out)]) == 0
    return out / "tiny-llama-int4"


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_run_writes_artifacts_report_and_manifest(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == ["fp32", "int4", "report.json"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["check"]["passed"] is True
    assert set(report["bench"]) == {"int4", "fp32"}
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "size_mb", "bits_per_weight"):
        assert report["bench"]["int4"][key] > 0
    m = json.loads((run_dir / "int4" / "manifest.json").read_text())
    assert m["recipe"]["name"] == "tiny-llama-int4"
    assert m["environment"]["dependencies"]["onnxruntime"]
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"}
    assert m["onnx"]["op_counts"]["com.microsoft::MatMulNBits"] == 2 * 4 + 1  # fused qkv, o, gate_up, down; head
    assert m["onnx"]["op_counts"]["com.microsoft::GatherBlockQuantized"] == 1
    assert 4 < m["weights"]["bits_per_weight"] < 5  # int4 + fp16 scales per 32 weights = 4.5
    assert m["reference_metrics"]["passed"] is True
    assert m["calibration"]["windows"] == 4 and m["calibration"]["layers"]
    fp32 = json.loads((run_dir / "fp32" / "manifest.json").read_text())
    assert fp32["weights"]["bits_per_weight"] == 32.0 and fp32["steps"] == []


def test_check_json_has_the_documented_keys(run_dir, capsys, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["check", str(run_dir / "int4"), "--runtime", "ort-cpu", "--data", str(held_out), "--json",
                 "--seq-len", "64", "--windows", "2"]) == 0
    out = _json(capsys)
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "kl", "top1_agreement", "tokens"):
        assert key in out
    assert out["tokens"] == 2 * 63
    assert out["perplexity_ratio"] == pytest.approx(out["perplexity"] / out["reference_perplexity"])


def test_check_fails_with_exit_3_on_a_crossed_threshold(run_dir, capsys):
    code = main(["check", str(run_dir / "int4"), "--json", "--seq-len", "64", "--windows", "1",
                 "--threshold", "top1_agreement=1.01"])
    assert code == 3
    assert _json(capsys)["passed"] is False


def test_torch_and_ort_runtimes_agree_on_the_artifact(run_dir, capsys):
    results = {}
    for rt in ("ort-cpu", "torch"):
        assert main(["check", str(run_dir / "fp32"), "--runtime", rt, "--json", "--seq-len", "64",
                     "--windows", "1"]) == 0
        results[rt] = _json(capsys)
    # the fp32 artifact is the uncompressed model: both runtimes reproduce it
    for r in results.values():
        assert r["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert r["top1_agreement"] == 1.0


def test_bench_json_keys(run_dir, capsys):
    assert main(["bench", str(run_dir / "int4"), "--json", "--prompt-tokens", "16", "--new-tokens", "4",
                 "--repeats", "1"]) == 0
    out = _json(capsys)
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "size_mb", "bits_per_weight"):
        assert out[key] > 0


def test_generate_runs_and_matches_torch_runtime(run_dir, capsys):
    outs = []
    for rt in ("ort-cpu", "torch"):
        assert main(["generate", str(run_dir / "int4"), "--runtime", rt, "--prompt", "Hello there",
                     "--max-new-tokens", "8", "--json"]) == 0
        outs.append(_json(capsys)["tokens"])
    assert outs[0] == outs[1] and 1 <= len(outs[0]) <= 8


def test_existing_output_is_refused_without_force(run_dir, capsys):
    before = (run_dir / "report.json").stat().st_mtime_ns
    assert main(["run", str(RECIPE), "-o", str(run_dir.parent), "--no-bench"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "report.json").stat().st_mtime_ns == before


def test_force_replaces_and_interrupt_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert main(["run", str(RECIPE), "-o", str(out), "--no-bench"]) == 0
    first = (out / "tiny-llama-int4" / "report.json").read_text()

    import edgecompress.pipeline as pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_target", boom)
    assert main(["run", str(RECIPE), "-o", str(out), "--no-bench", "--force"]) == 130
    # the earlier run is untouched and no temporary folder is left behind
    assert (out / "tiny-llama-int4" / "report.json").read_text() == first
    assert [p.name for p in out.iterdir()] == ["tiny-llama-int4"]
    monkeypatch.undo()
    assert main(["run", str(RECIPE), "-o", str(out), "--no-bench", "--force"]) == 0


def test_corrupt_artifact_is_detected(run_dir, tmp_path, capsys):
    art = tmp_path / "int4"
    shutil.copytree(run_dir / "int4", art)
    data = art / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["bench", str(art), "--json"]) == 2
    assert "sha256" in capsys.readouterr().err


def test_run_folder_instead_of_artifact_names_the_artifacts(run_dir, capsys):
    assert main(["check", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "fp32" in err and "int4" in err


def test_data_too_short_for_one_window(run_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["check", str(run_dir / "int4"), "--data", str(short), "--seq-len", "64"]) == 2
    assert "64" in capsys.readouterr().err


@pytest.mark.parametrize("text,needle", [
    ("name: x\nmodel: {source: tiny-llama}\nexport: [{format: onnx}]\nsteps:\n  - quantize: {bitz: 4}\n",
     "line 5"),
    ("name: x\nmodel: {source: no-such-model}\nexport: [{format: onnx}]\n", "no-such-model"),
    ("name: x\nmodel: {source: tiny-llama}\nexport: [{format: onnx}]\ncalibration: {data: /nope/missing.txt}\n",
     "missing.txt"),
])
def test_bad_recipes_exit_2_with_a_clear_message(tmp_path, capsys, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out" / "x").exists()


def test_models_lists_bundled_aliases(capsys):
    assert main(["models", "--json"]) == 0
    aliases = {m["alias"] for m in _json(capsys)}
    assert {"smollm2-135m", "minilm-l6", "efficientnet-lite0", "tiny-llama"} <= aliases


def test_progress_off_a_terminal_is_a_line_at_most_every_interval(capsys, monkeypatch):
    from edgecompress import progress

    clock = iter([0.0, 10.0, 70.0, 80.0, 200.0])  # start, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    advance = progress.log_ticker(8, "distill r32", every_s=60.0)
    for _ in range(4):
        advance()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "distill r32" in ln]
    assert len(lines) == 2, lines  # at 70 s and at 200 s; 10 s and 80 s are too soon after the last line
    assert "2/8 after 70 s, ~210 s left" in lines[0] and "4/8 after 200 s, ~200 s left" in lines[1]

    monkeypatch.undo()  # the real clock again
    assert not progress.console.is_terminal  # captured stderr: the ticker takes the log path
    with progress.ticker(3, "quiet", enabled=True) as tick:  # work shorter than a minute prints nothing
        for _ in range(3):
            tick()
    assert list(progress.track(range(3), 3, "quiet")) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err
