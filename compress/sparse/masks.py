"""Pruning scores and mask selection: pure functions on tensors, no modules.

Sibling methods share one signature ``scores(W, stats) -> [N, K]`` (higher = more important);
:func:`select_mask` turns scores into a keep-mask for a pattern:

* magnitude: ``|W_ij|``, compared over the whole layer (the usual baseline);
* Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models";
  cf. locuslab/wanda): ``|W_ij| * ||X_j||_2``, compared within each output row. ``||X_j||_2`` is
  ``sqrt(n * meansq_j)`` from the ``meansq`` observer; the constant ``sqrt(n)`` changes no ranking
  and is left out.

A pattern is ``"unstructured"`` (a fraction ``sparsity`` of the compared group is pruned, exactly
``floor(sparsity * group size)`` entries) or ``"N:M"``: in every run of M consecutive inputs of a
row, the N highest scores are kept (2:4 keeps 2 of every 4: 50% sparsity).
"""

from __future__ import annotations

import re

import torch

_NM_RE = re.compile(r"(\d+):(\d+)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N kept, M group) with ``0 < N < M``."""
    if pattern == "unstructured":
        return None
    m = _NM_RE.fullmatch(pattern)
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def pattern_sparsity(pattern: str, sparsity: float) -> float:
    """The fraction of weights a pattern prunes (``sparsity`` for unstructured, ``1 - N/M`` for N:M)."""
    nm = parse_pattern(pattern)
    return sparsity if nm is None else 1.0 - nm[0] / nm[1]


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    return W.detach().abs().to(torch.float32)


def wanda_scores(W: torch.Tensor, meansq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(meansq_j)``: Wanda's metric up to a constant factor."""
    if meansq.shape != (W.shape[1],):
        raise ValueError(f"Wanda needs one mean square per input channel: W {tuple(W.shape)}, meansq {tuple(meansq.shape)}")
    return W.detach().abs().to(torch.float32) * meansq.to(torch.float32).clamp(min=0).sqrt().unsqueeze(0)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores of a row (K must divide by m)."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity needs the input dimension to divide by M: K={k}, M={m}")
    groups = scores.reshape(rows, k // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, k)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured", *,
                per_row: bool = True) -> torch.Tensor:
    """Bool keep-mask ``[N, K]`` from scores.

    Unstructured: prune the ``floor(sparsity * K)`` lowest scores of each row (``per_row``) or the
    ``floor(sparsity * N * K)`` lowest of the layer. Ties are broken by position (stable sort).
    N:M: :func:`nm_mask` (``sparsity`` is implied by the pattern and ignored).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(scores.shape)}")
    nm = parse_pattern(pattern)
    if nm is not None:
        return nm_mask(scores, *nm)
    _check_sparsity(sparsity)
    flat = scores if per_row else scores.reshape(1, -1)
    n_prune = int(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(flat, dim=1, stable=True)[:, :n_prune]
        keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: the fraction of scores above ``m`` times their mean."""
    scores = scores.to(torch.float64)
    return float((scores > m * scores.mean()).double().mean())


def owl_sparsities(ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"; cf. luuyin/OWL): per-layer sparsities
    with the mean ``sparsity``, lower where the outlier ratio ``D_l`` is higher.

    ``D`` is rescaled to ``[0, 2 * lam]``; a layer keeps ``(1 - sparsity) + D_l - mean(D)`` of its
    weights, so every sparsity lies within ``sparsity +- lam`` and their mean is ``sparsity``.
    """
    _check_sparsity(sparsity)
    if lam < 0 or (lam > 0 and lam >= min(sparsity, 1 - sparsity)):
        raise ValueError(f"OWL lambda must be in [0, min(sparsity, 1 - sparsity)) = "
                         f"[0, {min(sparsity, 1 - sparsity):g}), got {lam}")
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min()) if len(ratios) else 0.0
    d = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    keep = d - d.mean() + (1 - sparsity)
    return [float(1 - k) for k in keep]
