"""Decode speed of one ONNX decoder artifact on ONNX Runtime and on its TVM compilation, side by side.

    .venv/bin/python benchmarks/tvm_decode.py ARTIFACT [--prompt 64] [--new 64] [--threads 2] [--json OUT]

Greedy decoding of the same prompt on both; reports tok/s for each, their ratio, the compile
time, and whether the greedy tokens agree. The TVM loop passes the present KV cache back as
the next step's past (the cache is concatenated each step; ORT's loop updates it in place).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm
    from edgecompress.export.tvm import build_decoder
    from edgecompress.runtimes.ort_cpu import OrtCpuRuntime
    from safetensors.numpy import load_file
    from tvm import relax

    from edgecompress.artifact import Artifact
    from edgecompress.data import load_text, token_windows

    art = Artifact.load(args.artifact)
    prompt = [int(t) for t in np.asarray(token_windows(art.tokenizer(), load_text("pydoc:eval"), args.prompt, 1))[0]]
    with tempfile.TemporaryDirectory() as tmp:
        info = build_decoder(art.onnx_path, Path(tmp), threads=args.threads)
        vm = relax.VirtualMachine(tvm.runtime.load_module(f"{tmp}/model.so"), tvm.cpu())
        stored = load_file(f"{tmp}/params.safetensors")
        params = [tvm.runtime.tensor(stored[k], tvm.cpu()) for k in sorted(stored)]
    ort_rt = OrtCpuRuntime(art, threads=args.threads)
    n_layers, kvh, hd = ort_rt.n_layers, ort_rt.kv_heads, ort_rt.head_dim
    ort_rt.generate(prompt, 4)  # warm up
    ort_gen = ort_rt.generate(prompt, args.new)

    def tvm_generate(n_new: int) -> tuple[list[int], float, float]:
        dev = tvm.cpu()
        cache = [tvm.runtime.tensor(np.zeros((1, kvh, 0, hd), np.float32), dev)] * (2 * n_layers)
        ids = np.asarray(prompt, np.int64).reshape(1, -1)
        t0 = time.perf_counter()
        out = vm["main"](tvm.runtime.tensor(ids, dev), tvm.runtime.tensor(np.ones_like(ids), dev), *cache, *params)
        tok = int(out[0].numpy()[0, -1].argmax())
        prefill = time.perf_counter() - t0
        tokens = [tok]
        t0 = time.perf_counter()
        for step in range(n_new - 1):
            cache = list(out)[1:]
            width = len(prompt) + step + 1
            out = vm["main"](tvm.runtime.tensor(np.array([[tok]], np.int64), dev),
                             tvm.runtime.tensor(np.ones((1, width), np.int64), dev), *cache, *params)
            tok = int(out[0].numpy()[0, -1].argmax())
            tokens.append(tok)
        return tokens, prefill, time.perf_counter() - t0

    tvm_generate(4)
    tokens, prefill, decode = tvm_generate(args.new)
    agree = float(np.mean([a == b for a, b in zip(tokens, ort_gen.tokens)]))
    row = {
        "artifact": str(args.artifact), "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": args.new,
        "ort_decode_tok_s": round(ort_gen.decode_tok_s, 1), "tvm_decode_tok_s": round((args.new - 1) / decode, 1),
        "tvm_over_ort_decode": round((args.new - 1) / decode / ort_gen.decode_tok_s, 3),
        "ort_prefill_tok_s": round(ort_gen.prefill_tok_s, 1), "tvm_prefill_tok_s": round(len(prompt) / prefill, 1),
        "greedy_token_agreement": agree, "compile": info,
    }
    json.dump(row, sys.stdout, indent=1)
    print()
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
