"""Where SmolLM2's int4 loss sits in the tied embedding / LM head, and what int8 rows buy (torch).

Everything but the tied ``[49152, 576]`` matrix stays float32. ``decompose``: the head alone, the
embedding alone, both (RTN and GPTQ, int4 symmetric blocks of 64; GPTQ on the Hessian of the final
normed hidden states). ``rows``: GPTQ int4 for every row, then the rows of the N tokens the
calibration windows use most replaced by their GPTQ int8 (blocks of 64) rows. Held-out windows of
``pydoc:eval``; perplexity ratio, KL and top-1 agreement against the float model.

    .venv/bin/python benchmarks/head_rows_study.py decompose --samples 16
    .venv/bin/python benchmarks/head_rows_study.py rows --samples 64 --rows 0 700 1400 3000
"""

from __future__ import annotations

import argparse
import time
from argparse import Namespace

import torch

from _common import held_out_metrics, smollm2_windows
from edgecompress.compress.quant.formats import QuantScheme, quantize_blockwise
from edgecompress.compress.quant.gptq import GPTQConfig, gptq_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["decompose", "rows"])
    ap.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens (head Hessian)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 700, 1400, 3000])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, calib, held, ref = smollm2_windows(Namespace(seq_len=512, samples=args.samples, eval_seq_len=512,
                                                        eval_windows=args.eval_windows))
    model.eval()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    W0 = emb.weight.data.clone()
    head.weight = torch.nn.Parameter(W0.clone())  # untie, so each side can be set alone

    def ev(tag: str) -> None:
        m = held_out_metrics(model, held, ref)
        print(f"{tag:48s} ratio {m['perplexity_ratio']:.4f} kl {m['kl']:.4f} top1 {m['top1_agreement']:.4f}",
              flush=True)

    acc, count = torch.zeros(576, 576, dtype=torch.float64), 0

    def hook(_m, inputs, _out) -> None:
        nonlocal acc, count
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        acc += x.T @ x
        count += x.shape[0]

    handle = head.register_forward_hook(hook)
    for row in calib:
        model(input_ids=row[None], use_cache=False)
    handle.remove()
    H = acc / count
    s4, s8 = QuantScheme(4, 64, True), QuantScheme(8, 64, True)
    cfg = GPTQConfig(damp=0.01, act_order=True)

    def both(w: torch.Tensor, tag: str) -> None:
        head.weight.data, emb.weight.data = w, w
        ev(tag)

    t = time.time()
    g4 = gptq_quantize(W0, H, s4, cfg)[0].to_float()
    print(f"head Hessian from {count} tokens; GPTQ of the head {time.time() - t:.1f} s", flush=True)
    if args.mode == "decompose":
        rtn = quantize_blockwise(W0, s4).to_float()
        head.weight.data = rtn
        ev("head RTN int4 b64 only")
        head.weight.data = g4
        ev("head GPTQ int4 b64 only")
        head.weight.data, emb.weight.data = W0.clone(), rtn
        ev("embedding RTN int4 b64 only")
        emb.weight.data = g4
        ev("embedding GPTQ codes only")
        both(g4, "both GPTQ int4 b64 (tied codes)")
        both(quantize_blockwise(W0, s8).to_float(), "both RTN int8 b64")
        both(gptq_quantize(W0, H, QuantScheme(4, 32, True), cfg)[0].to_float(), "both GPTQ int4 b32")
        return
    g8 = gptq_quantize(W0, H, s8, cfg)[0].to_float()
    freq = torch.bincount(calib.flatten(), minlength=W0.shape[0])
    order = torch.argsort(freq, descending=True)
    print(f"calibration tokens {int(freq.sum())}, distinct {int((freq > 0).sum())}", flush=True)
    for n in args.rows:
        w = g4.clone()
        w[order[:n]] = g8[order[:n]]
        share = float(freq[order[:n]].sum() / freq.sum())
        both(w, f"tied GPTQ int4, top {n} rows int8 (share {share:.2f})")


if __name__ == "__main__":
    main()
