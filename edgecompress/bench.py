"""Speed and size of an artifact on a runtime: prefill and decode tok/s (sentences/s for encoders),
peak RSS, size, bits/weight.

Timings are medians over ``repeats`` greedy generations of ``new_tokens`` after a
``prompt_tokens`` prompt of held-out text (EOS ignored, so every run decodes the same count),
after one untimed warm-up. Compare artifacts side by side in one run (`edgecompress run`
benches each in its own subprocess so peak RSS is per artifact).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .artifact import Artifact
from .data import load_text
from .errors import DataError, EdgeCompressError

BENCH_KEYS = ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "size_mb", "bits_per_weight")


def peak_rss_mb() -> float:
    """Peak resident set size of this process.

    Reads VmHWM (the high-water mark of this address space) on Linux: ``ru_maxrss`` survives
    fork+exec there, so a benchmark subprocess would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prompt_ids(artifact: Artifact, prompt_tokens: int, data: str = "pydoc:eval") -> list[int]:
    tok = artifact.tokenizer()
    ids = tok(load_text(data))["input_ids"]
    if len(ids) < prompt_tokens:
        raise DataError(f"{data} has {len(ids)} tokens, fewer than prompt_tokens={prompt_tokens}",
                        hint="use a longer text or fewer prompt tokens")
    return list(ids[:prompt_tokens])


def bench_artifact(artifact: Artifact, runtime: str = "ort-cpu", *, prompt_tokens: int = 512,
                   new_tokens: int = 128, threads: int | None = 2, repeats: int = 3,
                   data: str = "pydoc:eval") -> dict[str, Any]:
    from edgecompress.runtimes import open_runtime

    rt = open_runtime(runtime, artifact, threads=threads)
    if artifact.task == "sentence-encoder":
        return _bench_encoder(artifact, rt, runtime, threads=threads, repeats=repeats, data=data)
    if artifact.task == "image-classifier":
        return _bench_classifier(artifact, rt, runtime, threads=threads, repeats=repeats, data=data)
    prompt = prompt_ids(artifact, prompt_tokens, data)
    rt.generate(prompt[: min(32, prompt_tokens)], 4)  # warm-up: allocations, kernel selection
    runs = [rt.generate(prompt, new_tokens) for _ in range(repeats)]
    weights = artifact.manifest.get("weights", {})
    # a static NPU LM on qnn-htp: nodes per execution provider of each graph (CPU fallback is disabled at load)
    placed = {"placement": rt.placement, "compiled_from": rt.compiled_from} if hasattr(rt, "placement") else {}
    return {
        **placed,
        "artifact": str(artifact.path),
        "runtime": runtime,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "peak_rss_mb": peak_rss_mb(),
        "size_mb": artifact.size_bytes / 1e6,
        "bits_per_weight": weights.get("bits_per_weight"),
    }


def _bench_classifier(artifact: Artifact, rt: Any, runtime: str, *, threads: int | None, repeats: int, data: str,
                      images: int = 8) -> dict[str, Any]:
    """Images/s classifying ``images`` held-out crops one static batch at a time. ``data``: an image source
    (a text source falls back to the recipe's check images, else ``skimage:eval``)."""
    from .images import image_crops, is_image_source

    if not is_image_source(data):
        data = ((artifact.manifest.get("recipe") or {}).get("check") or {}).get("data") or "skimage:eval"
    x = image_crops(data, images, rt.image_size)
    rt.classify(x[: rt.batch_size])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.classify(x)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"artifact": str(artifact.path), "runtime": runtime, "threads": threads, "repeats": repeats,
            "data": data, "images": images, "images_s": images / sec, "peak_rss_mb": peak_rss_mb(),
            "size_mb": artifact.size_bytes / 1e6,
            "bits_per_weight": artifact.manifest.get("weights", {}).get("bits_per_weight")}


def _bench_encoder(artifact: Artifact, rt: Any, runtime: str, *, threads: int | None, repeats: int, data: str,
                   sentences: int = 64, max_len: int = 128) -> dict[str, Any]:
    """Sentences/s embedding ``sentences`` held-out sentences one at a time (as an app would)."""
    from edgecompress.runtimes.base import static_shape

    from .data import sentence_batches

    static = static_shape(artifact)
    if static is not None:  # an NPU artifact: sentences at most its static length
        max_len = min(max_len, static[1])
    batches = sentence_batches(artifact.tokenizer(), data, sentences, max_len=max_len)
    b0 = batches[0]
    rt.embed(b0["input_ids"].numpy(), b0["attention_mask"].numpy())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            rt.embed(b["input_ids"].numpy(), b["attention_mask"].numpy())
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"artifact": str(artifact.path), "runtime": runtime, "threads": threads, "repeats": repeats,
            "sentences": len(batches), "sentences_s": len(batches) / sec, "tokens_s": tokens / sec,
            "peak_rss_mb": peak_rss_mb(), "size_mb": artifact.size_bytes / 1e6,
            "bits_per_weight": artifact.manifest.get("weights", {}).get("bits_per_weight")}


def bench_in_subprocess(path: Path, runtime: str, *, prompt_tokens: int, new_tokens: int,
                        threads: int | None, repeats: int) -> dict[str, Any]:
    """Run ``edgecompress bench --json`` in a fresh process (clean peak RSS, no shared caches)."""
    cmd = [sys.executable, "-m", "edgecompress", "bench", str(path), "--runtime", runtime, "--json",
           "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgeCompressError(f"benchmark of {path} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)
