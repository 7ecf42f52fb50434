"""EfficientNet-Lite0 on the Qualcomm HTP simulator: top-1/top-5 agreement of the int8 NPU graph with fp32.

Natural images: scikit-image's bundled samples (the ``images`` extra; offline), split by file
(``skimage:calib`` = even-indexed files, ``skimage:eval`` = odd-indexed: no evaluation image is seen in
calibration), as random crops resized to 224 (``edgecompress.images.image_crops``). Each variant is the
recipe path's export (``export_npu_image_classifier``: BN folded, int8 symmetric per-output-channel
Conv/Gemm weights rounded by ``--variants``, uint16 activations) checked on the CPU EP; the variants in
``--htp`` also on the HTP simulator with CPU fallback disabled (2-3 s per image here).

Variants: ``nearest`` (round to nearest), ``nearest+bc`` (with bias correction), ``gptq``, ``gptq+bc``.

    .venv/bin/python benchmarks/npu_efficientnet.py --json benchmarks/results/npu-efficientnet.json  # 104 + 104 crops
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from edgecompress.export.npu import export_npu_image_classifier

from edgecompress.artifact import write_manifest
from edgecompress.check import classifier_metrics
from edgecompress.images import image_crops
from edgecompress.models import load_model


def logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 16])) for i in range(0, len(x), 16)]).numpy()


def kl(ref: np.ndarray, out: np.ndarray) -> float:
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lr, lo = log_softmax(ref), log_softmax(out)
    return float((np.exp(lr) * (lr - lo)).sum(1).mean())


def measure(runtime_name: str, art_path: Path, ev: np.ndarray, ref: np.ndarray) -> dict:
    from edgecompress.runtimes import open_runtime

    from edgecompress.artifact import Artifact

    rt = open_runtime(runtime_name, Artifact.load(art_path))
    t = time.perf_counter()
    out = rt.classify(ev)
    r = classifier_metrics(ref, out)
    return {"top1_agreement": round(r["top1_agreement"], 4), "top5_agreement": round(r["top5_agreement"], 4),
            "kl": round(kl(ref, out), 5), "s_per_image": round((time.perf_counter() - t) / len(ev), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=104, help="calibration crops (skimage:calib)")
    ap.add_argument("--eval", type=int, default=104, help="evaluation crops (skimage:eval)")
    ap.add_argument("--variants", default="nearest,nearest+bc,gptq,gptq+bc", help="comma-separated; see the docstring")
    ap.add_argument("--htp", default="gptq+bc", help="variants also run on the HTP ('' for none)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--model", default="efficientnet-lite0", help="model alias (tiny-efficientnet: a smoke run)")
    ap.add_argument("--size", type=int, default=224, help="image size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the rounding pass)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model.eval()
    cal = image_crops("skimage:calib", args.calib, args.size, mean=model.mean, std=model.std, seed=0)
    ev = image_crops("skimage:eval", args.eval, args.size, mean=model.mean, std=model.std, seed=0)
    ref = logits(model, ev)
    self_check = classifier_metrics(ref, ref)
    res = {"model": args.model, "calibration_images": len(cal), "eval_images": len(ev),
           "fp32_margin_median": round(self_check["reference_margin_median"], 4), "variants": {}}
    htp = [v for v in args.htp.split(",") if v]
    for variant in args.variants.split(","):
        method, _, bc = variant.partition("+")
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            body = export_npu_image_classifier(model, Path(tmp), cal, static_shapes={"batch_size": 1, "image_size": args.size},
                                               rounding=method, bias_correction=bc == "bc")
            write_manifest(Path(tmp), {"task": "image-classifier", **body})
            row = {"export_s": round(time.perf_counter() - t, 1), "placement": body["npu"]["placement"],
                   "weights": body["weights"]["params_by_format"],
                   "mean_rel_output_error": body["npu"]["weight_rounding"]["mean_rel_output_error"],
                   "bias_widened_channels": sum(v["channels"] for v in body["npu"]["bias_widened_channels"].values()),
                   "bias_widened_max_change": max((v["max_change"] for v in body["npu"]["bias_widened_channels"].values()),
                                                  default=0.0),
                   "cpu_ep": measure("ort-cpu", Path(tmp), ev, ref)}
            if variant in htp:
                row["htp"] = measure("qnn-htp", Path(tmp), ev, ref)
        res["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
