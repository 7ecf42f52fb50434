"""Accuracy checks of an artifact on a runtime against the uncompressed reference model.

Causal LMs: perplexity, KL(reference || artifact) per token, and top-1 agreement, over
fixed-length windows of held-out text (disjoint from calibration text). Sentence encoders:
cosine of each held-out sentence's embedding to the reference's (mean and worst), and how
often each sentence's nearest neighbour among the others is the same for both models. Image
classifiers: how often the artifact's top-1 class is the reference's (top-1 agreement) and how often the
reference's top-1 class is in the artifact's top 5 (top-5 agreement), on held-out image crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckFailed, EdgeCompressError
from .progress import track

THRESHOLD_DIRECTIONS = {"perplexity_ratio": "max", "kl": "max", "top1_agreement": "min", "top5_agreement": "min",
                        "cosine_mean": "min", "cosine_worst": "min", "neighbor_agreement": "min"}
TASK_METRICS = {"causal-lm": ("perplexity_ratio", "kl", "top1_agreement"),
                "sentence-encoder": ("cosine_mean", "cosine_worst", "neighbor_agreement"),
                "image-classifier": ("top1_agreement", "top5_agreement")}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class LMMetrics:
    """Streaming sums over evaluated tokens; :meth:`result` gives the report."""

    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    windows: int = 0

    def update(self, ref_logits: np.ndarray, logits: np.ndarray, ids: np.ndarray) -> None:
        """Add one window: logits ``[S, V]`` for ids ``[S]``; position t predicts ids[t+1]."""
        if ref_logits.shape != logits.shape:
            raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
        lp, rlp = _log_softmax(logits[:-1]), _log_softmax(ref_logits[:-1])
        tgt = ids[1:]
        rows = np.arange(len(tgt))
        self.nll += float(-lp[rows, tgt].sum())
        self.ref_nll += float(-rlp[rows, tgt].sum())
        self.kl += float((np.exp(rlp) * (rlp - lp)).sum())
        self.agree += int((lp.argmax(-1) == rlp.argmax(-1)).sum())
        self.tokens += len(tgt)
        self.windows += 1

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        ppl, ref_ppl = float(np.exp(self.nll / n)), float(np.exp(self.ref_nll / n))
        return {
            "perplexity": ppl,
            "reference_perplexity": ref_ppl,
            "perplexity_ratio": ppl / ref_ppl,
            "kl": self.kl / n,
            "top1_agreement": self.agree / n,
            "tokens": self.tokens,
            "windows": self.windows,
        }


@dataclass
class CheckResult:
    metrics: dict[str, float]
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**self.metrics, "thresholds": self.thresholds, "passed": self.passed, "failures": self.failures}

    def raise_if_failed(self, where: str = "") -> None:
        if self.failures:
            raise CheckFailed("accuracy check failed: " + "; ".join(self.failures) + where,
                              hint="loosen the recipe's check.thresholds or choose a gentler compression")


def apply_thresholds(metrics: dict[str, float], thresholds: dict[str, float | None]) -> CheckResult:
    active = {k: v for k, v in thresholds.items() if v is not None}
    unknown = [k for k in active if k not in metrics]
    if unknown:
        raise EdgeCompressError(f"threshold(s) {', '.join(unknown)} do not apply to this model's check",
                                hint=f"this check measures {', '.join(k for k in metrics if k in THRESHOLD_DIRECTIONS)}")
    failures = []
    for key, bound in active.items():
        value = metrics[key]
        if THRESHOLD_DIRECTIONS[key] == "max" and value > bound:
            failures.append(f"{key} {value:.4f} > max {bound}")
        if THRESHOLD_DIRECTIONS[key] == "min" and value < bound:
            failures.append(f"{key} {value:.4f} < min {bound}")
    return CheckResult(metrics, active, failures)


def check_causal_lm(logits_fn: Callable[[np.ndarray], np.ndarray], reference: torch.nn.Module,
                    windows: torch.Tensor, *, progress: bool = False) -> dict[str, float]:
    """Compare ``logits_fn`` (the artifact on a runtime) with the reference torch model."""
    m = LMMetrics()
    for row in track(windows, len(windows), "checking", progress):
        ids = row.numpy()
        with torch.no_grad():
            ref = reference(input_ids=row[None], use_cache=False).logits[0].float().numpy()
        m.update(ref, logits_fn(ids), ids)
    return m.result()


def encoder_metrics(ref: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    """Agreement of embeddings ``emb [N, H]`` with the reference ``ref [N, H]`` (same sentences)."""
    if ref.shape != emb.shape:
        raise ValueError(f"embedding shapes differ: {ref.shape} vs {emb.shape}")
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True).clip(1e-12)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    cos = (r * e).sum(1)
    out = {"cosine_mean": float(cos.mean()), "cosine_worst": float(cos.min()), "sentences": len(cos)}
    if len(cos) > 2:
        sr, se = r @ r.T, e @ e.T
        np.fill_diagonal(sr, -np.inf)
        np.fill_diagonal(se, -np.inf)
        out["neighbor_agreement"] = float((sr.argmax(1) == se.argmax(1)).mean())
    return out


def check_sentence_encoder(embed_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], reference: torch.nn.Module,
                           batches: list[dict[str, torch.Tensor]], *, progress: bool = False) -> dict[str, float]:
    """Compare ``embed_fn(input_ids, attention_mask)`` (the artifact) with the reference encoder."""
    refs, embs = [], []
    for b in track(batches, len(batches), "checking", progress):
        with torch.no_grad():
            refs.append(reference(b["input_ids"], b["attention_mask"]).float().numpy())
        embs.append(embed_fn(b["input_ids"].numpy(), b["attention_mask"].numpy()))
    return encoder_metrics(np.concatenate(refs), np.concatenate(embs))


def classifier_metrics(ref: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Top-1 / top-5 agreement of ``logits [N, C]`` with the reference's ``ref [N, C]`` (same images), and the
    reference's median top-1 - top-2 softmax margin (how fragile argmax agreement is on these images)."""
    if ref.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {logits.shape}")
    top = ref.argmax(1)
    top5 = np.argsort(-logits, 1)[:, :5]
    p = np.exp(_log_softmax(ref))
    p.sort(1)
    return {"top1_agreement": float((logits.argmax(1) == top).mean()),
            "top5_agreement": float((top5 == top[:, None]).any(1).mean()),
            "images": len(ref), "reference_margin_median": float(np.median(p[:, -1] - p[:, -2]))}


def check_image_classifier(classify_fn: Callable[[np.ndarray], np.ndarray], reference: torch.nn.Module,
                           images: np.ndarray, *, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Compare ``classify_fn(images) -> logits`` (the artifact) with the reference classifier."""
    refs, outs = [], []
    for i in track(range(0, len(images), batch_size), -(-len(images) // batch_size), "checking", progress):
        x = images[i:i + batch_size]
        with torch.no_grad():
            refs.append(reference(torch.from_numpy(x)).float().numpy())
        outs.append(classify_fn(x))
    return classifier_metrics(np.concatenate(refs), np.concatenate(outs))


def evaluate(rt: Any, task: str, reference: torch.nn.Module, tokenizer: Any, data: str, *, seq_len: int,
             windows: int, progress: bool = False) -> dict[str, float]:
    """The task's metrics of runtime ``rt`` against ``reference`` on held-out ``data``: ``windows``
    windows of ``seq_len`` tokens (causal LMs) or ``windows`` sentences of at most ``seq_len``
    tokens, in batches of 16 (sentence encoders), or ``windows`` crops of held-out images at the artifact's
    static size (image classifiers; ``tokenizer`` and ``seq_len`` unused)."""
    from .data import load_text, sentence_batches, token_windows

    if task == "sentence-encoder":
        batches = sentence_batches(tokenizer, data, windows, max_len=seq_len, batch_size=16)
        return check_sentence_encoder(rt.embed, reference, batches, progress=progress)
    if task == "image-classifier":
        from .images import image_crops, is_image_source

        if not is_image_source(data):
            raise EdgeCompressError(f"image classifiers are checked on images, and {data!r} is text",
                                    hint="check data: skimage:eval or a folder of images")
        images = image_crops(data, windows, rt.image_size, mean=reference.mean, std=reference.std)
        return check_image_classifier(rt.classify, reference, images, progress=progress)
    if task == "causal-lm":
        rows = token_windows(tokenizer, load_text(data), seq_len, windows, seed=0)
        metrics = check_causal_lm(rt.logits, reference, rows, progress=progress)
        sparsity = measured_act_sparsity(rt.artifact, rows)
        return metrics if sparsity is None else {**metrics, "activation_sparsity": sparsity}
    raise EdgeCompressError(f"no accuracy check for {task} models yet", hint="checks cover causal-lm, sentence-encoder and image-classifier")


def measured_act_sparsity(artifact: Any, windows: torch.Tensor) -> float | None:
    """Fraction of the thresholded inputs that ``edgecompress::ActSparse`` zeroes on ``windows``, weighted by
    the parameters of the linears reading each one (the weight columns a sparse kernel skips; a CATS site
    counts its up_proj and down_proj), measured by ONNX Runtime on the artifact's ONNX graph with the
    op outputs exposed; None for an artifact without thresholds (or without an ONNX graph)."""
    import onnx
    import onnxruntime as ort

    from edgecompress.export.onnx_act_sparse import ACT_SPARSE, CATS_SUFFIX
    from edgecompress.export.onnx_custom import DOMAIN

    path = getattr(artifact, "onnx_path", None)
    if path is None or not Path(path).exists():
        return None
    model = onnx.load(str(path), load_external_data=False)  # the graph only, until it has thresholds
    sites = {n.input[1]: n.output[0] for n in model.graph.node
             if n.op_type == ACT_SPARSE and n.domain == DOMAIN}
    if not sites:
        return None
    onnx.load_external_data_for_model(model, str(Path(path).parent))
    weight = dict.fromkeys(sites, 0)
    # a CATS threshold is on down_proj's row; up_proj [I, H] has as many weights as down_proj [H, I]
    for r in artifact.manifest.get("layers", []):
        for key, share in (("act_threshold", 1), (CATS_SUFFIX, 2)):
            thr = r.get("initializers", {}).get(key)
            if thr in weight:
                weight[thr] += share * r["params"]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)
                              for y in sites.values() if y not in known)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    past = {i.name: np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32)  # [batch, kv heads, past, dim]
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    zeros, total = dict.fromkeys(sites, 0), dict.fromkeys(sites, 0)
    names = list(sites.values())
    for row in windows:
        ids = row.numpy().astype(np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}
        for thr, y in zip(sites, session.run(names, feeds)):
            zeros[thr] += int((y == 0).sum())
            total[thr] += y.size
    all_weight = sum(weight.values())
    if not all_weight:
        return None
    return float(sum(zeros[t] / max(total[t], 1) * weight[t] for t in sites) / all_weight)
