"""What the SmolLM2 torch-level benchmark tables share: the model, calibration windows of
``pydoc:calib``, held-out windows of ``pydoc:eval`` (disjoint) and the uncompressed model's logits
on them."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import numpy as np
import torch

from edgecompress.check import LMMetrics
from edgecompress.data import load_text, token_windows
from edgecompress.models import load_model


def smollm2_windows(args: Namespace) -> tuple[Any, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """``(reference model, calibration windows, held-out windows, reference logits per held-out window)``
    from ``args.seq_len``/``args.samples`` (calibration) and ``args.eval_seq_len``/``args.eval_windows``."""
    lm = load_model("smollm2-135m")
    reference = lm.model
    calib = token_windows(lm.tokenizer, load_text("pydoc:calib"), args.seq_len, args.samples, seed=0)
    held_out = token_windows(lm.tokenizer, load_text("pydoc:eval"), args.eval_seq_len, args.eval_windows, seed=0)
    with torch.no_grad():
        ref_logits = [reference(input_ids=row[None], use_cache=False).logits[0].float().numpy() for row in held_out]
    return reference, calib, held_out, ref_logits


def held_out_metrics(model: Any, held_out: torch.Tensor, ref_logits: list[np.ndarray]) -> dict:
    """The check's metrics (perplexity ratio, KL, top-1 agreement, ...) of a torch causal LM against
    the reference logits of :func:`smollm2_windows`."""
    m = LMMetrics()
    with torch.no_grad():
        for row, ref in zip(held_out, ref_logits):
            m.update(ref, model(input_ids=row[None], use_cache=False).logits[0].float().numpy(), row.numpy())
    return m.result()


def interleaved_medians(kernels: dict[str, tuple], calls: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each ``name: (function, argument sets, ...)``, the median of ``repeats`` rounds;
    each round times every kernel in turn (a change in the machine's load hits all alike), ``calls``
    calls cycling through its argument sets (copies of the weights, so that they come from DRAM)."""
    import statistics
    import time

    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, (f, arg_sets, *_) in kernels.items():
            f(*arg_sets[0])
            t0 = time.perf_counter()
            for i in range(calls):
                f(*arg_sets[i % len(arg_sets)])
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in times.items()}


def tvm_kernel_builder(threads: int):
    """``(tvm_kernels module, build)`` for kernel microbenchmarks: TVM's pool sized to ``threads``, and
    ``build(prim_func)`` compiling one kernel for this CPU and returning it callable."""
    import tvm

    from edgecompress.export import tvm_kernels as kern

    target = kern.target_llvm(threads=kern.set_threads(threads))

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]

    return kern, build
