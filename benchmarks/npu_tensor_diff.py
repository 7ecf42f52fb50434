"""Where does the HTP lose accuracy? Every quantized intermediate tensor of SmolLM2's NPU prefill graph on
the HTP simulator and on the CPU EP, each against the float graph.

Takes the run folder of ``recipes/smollm2-135m-npu.yaml``. The QDQ prefill graph gets every
``Q -> DQ`` pair that follows a compute op (MatMul, Add, Mul, Softmax, Sigmoid, LpNormalization) as an
extra output; the float static prefill graph of the same model is traced again and gives the same tensors
unquantized. One held-out window of ``pydoc:eval``. For each tensor: the relative RMS error
(``rms(x - ref) / std(ref)``) of the CPU EP and of the HTP against the float graph, in graph order.

    python benchmarks/npu_tensor_diff.py out/smollm2-135m-npu --json benchmarks/results/npu-smollm2-tensors.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from edgecompress.artifact import Artifact
from edgecompress.data import load_text, token_windows
from edgecompress.export.npu import prepare_for_npu
from edgecompress.export.npu_llm import prefill_feeds, static_llm_onnx
from edgecompress.models import load_model
from edgecompress.runtimes.qnn_htp import htp_session

OPS = ("LpNormalization", "Softmax", "Add", "Sigmoid", "Mul", "MatMul")


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((x - ref) ** 2).mean()) / (ref.std() + 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run folder of recipes/smollm2-135m-npu.yaml")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    art = Artifact.load(args.run / "npu")
    p, c = art.manifest["npu"]["static_shapes"]["prefill_len"], art.manifest["npu"]["static_shapes"]["max_context"]
    qdq = onnx.load(str(art.path / "prefill.onnx"))
    prod = {o: n for n in qdq.graph.node for o in n.output}
    picked, seen = [], set()  # (op type, op name, float tensor, dequantized tensor)
    for n in qdq.graph.node:
        q = prod.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        src = prod.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if src is not None and src.op_type == "Cast" and src.input[0] in prod:  # a float16 MatMul's output
            src = prod[src.input[0]]
            src = src if src.op_type == "MatMul" else None
        if src is None or src.op_type not in OPS or src.name in seen:
            continue
        seen.add(src.name)
        picked.append((src.op_type, src.name, q.input[0], n.output[0]))
    for *_, t in picked:
        qdq.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))

    lm = load_model(art.manifest["model"]["spec"])
    fp, _ = prepare_for_npu(static_llm_onnx(lm.model, "prefill", prefill_len=p, max_context=c),
                            {"batch_size": 1, "prefill_len": p, "max_context": c})
    have = {o for n in fp.graph.node for o in n.output}
    picked = [row for row in picked if row[2] in have]
    for _, _, s, _ in picked:
        fp.graph.output.append(helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None))
    window = token_windows(art.tokenizer(), load_text("pydoc:eval"), p, 1, seed=0).numpy()
    feeds = prefill_feeds(window, p)[0]
    with tempfile.TemporaryDirectory() as d:
        onnx.save(qdq, f"{d}/q.onnx", save_as_external_data=True, location="q.data")
        onnx.save(fp, f"{d}/f.onnx", save_as_external_data=True, location="f.data")
        qnames, fnames = [t for *_, t in picked] + ["logits"], [s for _, _, s, _ in picked] + ["logits"]
        ref = ort.InferenceSession(f"{d}/f.onnx", providers=["CPUExecutionProvider"]).run(fnames, feeds)
        cpu = ort.InferenceSession(f"{d}/q.onnx", providers=["CPUExecutionProvider"]).run(qnames, feeds)
        htp = htp_session(f"{d}/q.onnx").run(qnames, feeds)
    rows = []
    for (op, name), r, x, h in zip([(o, n) for o, n, _, _ in picked] + [("logits", "logits")], ref, cpu, htp):
        rows.append({"op": op, "name": name, "cpu_vs_float": rel(x, r), "htp_vs_float": rel(h, r)})
        print(f"{op:16s} {name:28s} cpu {rows[-1]['cpu_vs_float']:.5f}  htp {rows[-1]['htp_vs_float']:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "window_tokens": p, "tensors": rows}, indent=1))


if __name__ == "__main__":
    main()
