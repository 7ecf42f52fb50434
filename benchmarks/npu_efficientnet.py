"""EfficientNet-Lite0 on the Qualcomm HTP simulator: top-1/top-5 agreement of the int8 NPU graph with fp32.

Natural images: scikit-image's bundled samples (``pip install scikit-image``; 26 files, offline), split by
file into calibration (even indices, 2 random crops each) and evaluation (odd indices, 4 crops each),
so no evaluation image is seen in calibration. Crops are resized to 224, randomly flipped, scaled to
``(x - 0.5) / 0.5``. The graph: TorchScript export (BN folded), int8 symmetric per-channel Conv/Gemm
weights, uint16 activations (``write_npu_artifact``); run on the CPU EP and on the HTP with CPU fallback
disabled. A second QDQ model of the same graph with 16-bit per-channel weights (everything else the same)
shows where the loss is; the HTP is asked to load it too.

    .venv/bin/python benchmarks/npu_efficientnet.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from edgecompress.export.npu import image_classifier_onnx, write_npu_artifact
from edgecompress.runtimes.qnn_htp import htp_session

from edgecompress.models import load_model


def sample_images() -> list[tuple[str, np.ndarray]]:
    try:
        import skimage
        import skimage.io
    except ImportError:
        raise SystemExit("this benchmark reads scikit-image's bundled sample images: pip install scikit-image") from None
    d = Path(skimage.__file__).parent / "data"
    out = []
    for f in sorted(p for p in os.listdir(d) if p.endswith((".png", ".jpg"))):
        im = skimage.io.imread(d / f)
        im = np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3]
        out.append((f, im))
    return out


def crops(im: np.ndarray, n: int, rng: np.random.Generator, size: int = 224) -> list[np.ndarray]:
    from skimage.transform import resize

    h, w = im.shape[:2]
    out = []
    for _ in range(n):
        s = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        c = resize(im[y:y + s, x:x + s], (size, size), anti_aliasing=True, preserve_range=True) / 255.0
        if rng.random() < 0.5:
            c = c[:, ::-1]
        out.append(((c - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32))
    return out


def agreement(run, images, refs) -> dict:
    t1 = t5 = 0
    for x, r in zip(images, refs):
        o = run(x)
        t1 += int(o.argmax() == r.argmax())
        t5 += int(r.argmax() in np.argsort(-o)[:5])
    return {"top1_agreement": round(t1 / len(images), 4), "top5_agreement": round(t5 / len(images), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    rng = np.random.default_rng(0)
    files = sample_images()
    cal = [c for _, im in files[0::2] for c in crops(im, 2, rng)]
    ev = [c for _, im in files[1::2] for c in crops(im, 4, rng)]
    model = load_model("efficientnet-lite0").model.eval()
    with torch.no_grad():
        refs = [model(torch.from_numpy(x)).numpy()[0] for x in ev]
    probs = [np.sort(torch.softmax(torch.from_numpy(r), 0).numpy())[::-1] for r in refs]
    res = {"calibration_images": len(cal), "eval_images": len(ev),
           "fp32_top1_prob_median": round(float(np.median([p[0] for p in probs])), 3),
           "fp32_margin_below_0.1": int(sum((p[0] - p[1]) < 0.1 for p in probs))}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        body = write_npu_artifact(image_classifier_onnx(model), Path(tmp), [{"pixel_values": x} for x in cal],
                                  static_shapes={})
        res["export_s"] = round(time.perf_counter() - t, 1)
        res["placement"] = body["npu"]["placement"]
        res["weights"] = body["weights"]["params_by_format"]
        cpu = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        res["cpu_ep"] = agreement(lambda x: cpu.run(None, {"pixel_values": x})[0][0], ev, refs)
        htp = htp_session(Path(tmp) / "model_ctx.onnx")
        t = time.perf_counter()
        res["htp"] = agreement(lambda x: htp.run(None, {"pixel_values": x})[0][0], ev, refs)
        res["htp_s_per_image"] = round((time.perf_counter() - t) / len(ev), 2)
        res["int16_weights"] = int16_weights(Path(tmp), image_classifier_onnx(model), cal, ev, refs)
    print(json.dumps(res, indent=2))


def int16_weights(tmp: Path, proto, cal, ev, refs) -> dict:
    """The same preparation and QDQ rules with int16 instead of int8 per-channel Conv/Gemm weights."""
    import onnx
    from edgecompress.export.npu import prepare_for_npu
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    prepared, _ = prepare_for_npu(proto, {})
    onnx.save(prepared, str(tmp / "w16_fp32.onnx"))
    inits = {i.name for i in prepared.graph.initializer}
    overrides = {n.input[1]: [{"axis": 0, "quant_type": QuantType.QInt16, "symmetric": True}]
                 for n in prepared.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"pixel_values": x} for x in cal])

        def get_next(self):
            return next(self.it, None)

    cfg = get_qnn_qdq_config(str(tmp / "w16_fp32.onnx"), Reader(), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8, init_overrides=overrides)
    quantize(str(tmp / "w16_fp32.onnx"), str(tmp / "w16.onnx"), cfg)
    cpu = ort.InferenceSession(str(tmp / "w16.onnx"), providers=["CPUExecutionProvider"])
    out = {"cpu_ep": agreement(lambda x: cpu.run(None, {"pixel_values": x})[0][0], ev, refs)}
    try:
        htp_session(tmp / "w16.onnx")
        out["htp"] = "loads"
    except Exception as e:  # noqa: BLE001 - report why the HTP refuses it
        out["htp"] = "refused: " + str(e).split("disabled: ")[-1][:200]
    return out


if __name__ == "__main__":
    main()
