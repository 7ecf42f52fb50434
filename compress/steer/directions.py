"""Steering directions from the activations of two prompt sets (pure: tensors in, vector out).

Both methods return a vector ``v`` on the activations' own scale, so a strength of 1 moves
the mean of the negative set onto the mean of the positive set along ``v``:

* **difference of means** (ActAdd, Turner et al. 2023; CAA, Rimsky et al. 2024):
  ``v = mean(P) - mean(N)``; the two sets need not be paired or of equal size.
* **PCA of paired differences** (Representation Engineering, Zou et al. 2023): with
  ``d_i = p_i - n_i``, ``u`` is the top eigenvector of ``(1/n) sum_i d_i d_i^T``, signed so
  that ``mean(d) . u > 0``, and ``v = u * mean(d . u)``. The matrix is not centred: RepE
  flips the order of random pairs before a centred PCA, which gives the same matrix in
  expectation; centring would remove exactly the shift we want.

Computed in float64, returned as float32.
"""

from __future__ import annotations

import math

import torch


def mean_difference(pos_mean: torch.Tensor, neg_mean: torch.Tensor) -> torch.Tensor:
    """``v = mean(P) - mean(N)`` from the two sets' mean activations ``[C]``."""
    if pos_mean.shape != neg_mean.shape or pos_mean.dim() != 1:
        raise ValueError(f"expected two [C] means of one shape, got {tuple(pos_mean.shape)} and {tuple(neg_mean.shape)}")
    return (pos_mean.double() - neg_mean.double()).float()


def pca_of_differences(pos_rows: torch.Tensor, neg_rows: torch.Tensor) -> torch.Tensor:
    """Top principal direction of the paired differences ``P - N`` (rows ``[n, C]`` each), scaled
    to the mean projection of the differences on it."""
    if pos_rows.shape != neg_rows.shape or pos_rows.dim() != 2:
        raise ValueError(f"PCA of paired differences needs two [n, C] sets of one shape, got "
                         f"{tuple(pos_rows.shape)} and {tuple(neg_rows.shape)}")
    d = pos_rows.double() - neg_rows.double()
    second_moment = d.T @ d / d.shape[0]
    _, vecs = torch.linalg.eigh(second_moment)  # ascending eigenvalues
    u = vecs[:, -1]
    proj = float((d @ u).mean())
    if proj < 0:
        u, proj = -u, -proj
    return (u * proj).float()


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / |v|`` (float64 norm); a zero vector is an error (the two sets do not differ)."""
    n = float(v.double().norm())
    if n == 0.0 or not math.isfinite(n):
        raise ValueError("the steering direction is zero (or not finite): the two prompt sets give the same activations")
    return (v.double() / n).float()
