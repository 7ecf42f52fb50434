"""Low-rank compensation of a compression error: plain SVD and EoRA. Pure functions on tensors.

A compressed layer ``W_c`` is corrected by a rank-``r`` term, ``W_c + B A`` (``B [N, r]``,
``A [r, K]``), fitted to the error ``dW = W - W_c``.

* :func:`svd_lowrank` minimises ``||dW - B A||_F`` (truncated SVD).
* :func:`eora_lowrank` (Liu et al. 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with
  Eigenspace Low-Rank Approximation") minimises the output error on the calibration inputs,
  ``tr(E H E^T)`` with ``E = dW - B A`` and ``H = X^T X / n = Q diag(lam) Q^T`` (the ``hessian``
  observer): project ``dW' = dW Q diag(sqrt lam)``, truncate its SVD to rank r, map back with
  ``diag(1 / sqrt lam) Q^T``. Eigenvalues below ``eps * max(lam)`` are raised to it (directions
  the data never excites cost nothing and would otherwise blow up the inverse).
"""

from __future__ import annotations

import torch


def _check(dW: torch.Tensor, rank: int) -> None:
    if dW.dim() != 2:
        raise ValueError(f"need a 2-D weight error, got shape {tuple(dW.shape)}")
    if not 1 <= rank <= min(dW.shape):
        raise ValueError(f"rank must be in [1, min(N, K)] = [1, {min(dW.shape)}] for a {tuple(dW.shape)} "
                         f"matrix, got {rank}")


def weighted_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(E H E^T)``: the summed squared output error of a weight error ``E`` on inputs with covariance ``H``."""
    E = E.double()
    return float(((E @ H.double()) * E).sum())


def svd_lowrank(dW: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``dW`` in the Frobenius norm: ``(B [N, r], A [r, K])``."""
    _check(dW, rank)
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]).float(), Vh[:rank].float()


def eora_lowrank(dW: torch.Tensor, H: torch.Tensor, rank: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA: the rank-``rank`` ``B A`` minimising ``tr((dW - B A) H (dW - B A)^T)``."""
    _check(dW, rank)
    if H.shape != (dW.shape[1], dW.shape[1]):
        raise ValueError(f"EoRA needs H [K, K] for dW {tuple(dW.shape)}, got {tuple(H.shape)}")
    lam, Q = torch.linalg.eigh(H.double())
    top = float(lam.max())
    if not top > 0:
        raise ValueError("EoRA: the input covariance is zero (the layer saw no signal)")
    root = lam.clamp(min=eps * top).sqrt()
    U, S, Vh = torch.linalg.svd(dW.double() @ (Q * root), full_matrices=False)
    B = U[:, :rank] * S[:rank]
    A = (Vh[:rank] / root) @ Q.T
    return B.float(), A.float()
