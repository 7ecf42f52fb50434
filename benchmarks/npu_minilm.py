"""MiniLM on the Qualcomm HTP simulator: the toolkit's npu-qnn artifact vs ONNX Runtime's own QNN recipe.

One run, same static [1, S] fp32 graph, same calibration sentences (pydoc:calib) and held-out sentences
(pydoc:eval):

* ``ort-qnn-recipe``: ``get_qnn_qdq_config`` (uint16 activations, uint8 weights) + ``quantize`` on the
  graph as exported (float32.min mask sentinel, ReduceL2/Max/Div normalisation);
* ``edgecompress``: :func:`edgecompress.export.npu.export_npu_encoder` (rewrites, int8 per-channel
  MatMul weights, uint16 activations).

Each is run on the CPU EP and on the HTP backend with CPU fallback disabled; cosine of the sentence
embeddings to the fp32 model's, and the simulator's seconds per sentence.

    .venv/bin/python benchmarks/npu_minilm.py --sentences 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgecompress.data import sentence_batches
from edgecompress.export.npu import export_npu_encoder, fold_constants, make_static, pad_feeds
from edgecompress.export.onnx_encoder import build_bert_encoder
from edgecompress.models import load_model
from edgecompress.runtimes.qnn_htp import htp_session


def cosines(sess, feeds, refs) -> list[float]:
    out = []
    for f, r in zip(feeds, refs):
        e = sess.run(["sentence_embedding"], f)[0][0]
        out.append(float(e @ r / np.linalg.norm(e) / np.linalg.norm(r)))
    return out


def summary(c: list[float]) -> dict:
    return {"cosine_mean": round(float(np.mean(c)), 5), "cosine_worst": round(float(np.min(c)), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=64, help="held-out sentences (the simulator: ~0.8 s each)")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    s = args.seq_len
    lm = load_model("minilm-l6")
    enc, tok = lm.model.eval(), lm.tokenizer
    cal = pad_feeds([{k: v.numpy() for k, v in b.items()} for b in
                     sentence_batches(tok, "pydoc:calib", args.calibration, max_len=s)], 1, s)
    ev = pad_feeds([{k: v.numpy() for k, v in b.items()} for b in
                    sentence_batches(tok, "pydoc:eval", args.sentences, max_len=s)], 1, s)
    with torch.no_grad():
        refs = [enc(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))[0].numpy() for f in ev]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ONNX Runtime's QNN recipe on the graph as exported
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        proto, _ = build_bert_encoder(enc)
        fp32 = fold_constants(make_static(proto, {"batch_size": 1, "sequence_length": s}))
        onnx.save(fp32, str(tmp / "fp32.onnx"))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(cal)

            def get_next(self):
                return next(self.it, None)

        cfg = get_qnn_qdq_config(str(tmp / "fp32.onnx"), Reader(), activation_type=QuantType.QUInt16,
                                 weight_type=QuantType.QUInt8)
        quantize(str(tmp / "fp32.onnx"), str(tmp / "ortqnn.onnx"), cfg)
        cpu = ort.InferenceSession(str(tmp / "ortqnn.onnx"), providers=["CPUExecutionProvider"])
        r = {"cpu_ep": summary(cosines(cpu, ev, refs))}
        try:
            htp_session(tmp / "ortqnn.onnx")
            r["htp"] = "loads"
        except Exception as e:  # noqa: BLE001 - report why the HTP refuses it
            r["htp"] = f"fails: {str(e).split('disabled: ')[-1][:160]}"
        results["ort-qnn-recipe"] = r

        # the toolkit's artifact
        t = time.perf_counter()
        (tmp / "ec").mkdir()
        body = export_npu_encoder(enc, tmp / "ec", cal, static_shapes={"batch_size": 1, "sequence_length": s})
        export_s = time.perf_counter() - t
        cpu = ort.InferenceSession(str(tmp / "ec" / "model.onnx"), providers=["CPUExecutionProvider"])
        r = {"export_s": round(export_s, 1), "placement": body["npu"]["placement"],
             "model_mb": round((tmp / "ec" / "model.onnx").stat().st_size / 1e6, 1),
             "cpu_ep": summary(cosines(cpu, ev, refs))}
        t = time.perf_counter()
        htp = htp_session(tmp / "ec" / "model_ctx.onnx")
        r["htp_context_load_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        r["htp"] = summary(cosines(htp, ev, refs))
        r["htp_s_per_sentence"] = round((time.perf_counter() - t) / len(ev), 3)
        results["edgecompress"] = r
    print(json.dumps({"sentences": len(ev), "calibration": len(cal), "seq_len": s, **results}, indent=2))


if __name__ == "__main__":
    main()
