"""SparseGPT: one-shot pruning with OBS weight reconstruction, on the GPTQ Hessian.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (cf. IST-DASLab/sparsegpt ``fasterprune``). Pure core: :func:`sparsegpt_prune` takes
``W [N, K]`` and ``H = (1/n) sum_t x_t x_t^T`` (the ``hessian`` observer, the statistic GPTQ uses;
the paper's factor 2 cancels) and shares GPTQ's damped inverse-Cholesky factor ``U`` of ``Hinv``.

Columns are visited left to right in lazy blocks of ``block`` columns. The mask of a block is
chosen when the sweep reaches it (adaptive mask selection) by the OBS saliency
``w_ij^2 / U_jj^2`` on the current, already error-updated weights: unstructured prunes exactly
``floor(sparsity * N * block)`` entries of the block; N:M keeps the N most salient of every
M columns of a row, choosing when the sweep reaches the group. Each column's pruned entries are
set to zero and the scaled error ``(w_j - q_j) / U_jj`` is fed into the not-yet-visited
columns, ``W[:, j+1:] -= err_j (x) U[j, j+1:]``, exactly as GPTQ feeds rounding errors.
"""

from __future__ import annotations

import logging

import torch

from edgecompress.compress.quant.gptq import _upper_chol_inverse

from .masks import _check_sparsity, parse_pattern

log = logging.getLogger(__name__)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str = "unstructured", *,
                    damp: float = 0.01, block: int = 128,
                    max_damp_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``W [N, K]`` given ``H [K, K]``; returns (updated weights with zeros, keep-mask, diagnostics).

    Diagnostics: ``damp_used`` (relative damping that made ``H`` positive definite), ``loss``
    (``sum_j ||w_j - q_j||^2 / U_jj^2``), ``dead_columns`` (inputs never active: ``H_jj = 0``;
    their weights are set to zero and stay in the mask).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"SparseGPT needs W [N, K] and H [K, K], got {tuple(W.shape)} and {tuple(H.shape)}")
    N, K = W.shape
    nm = parse_pattern(pattern)
    if nm is None:
        _check_sparsity(sparsity)
    elif K % nm[1]:
        raise ValueError(f"N:M sparsity needs the input dimension to divide by M: K={K}, M={nm[1]}")
    where = f"layer [N={N}, K={K}]"
    for name, t in (("Hessian", H), ("weight", W)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"SparseGPT {where}: the {name} has non-finite values (NaN/inf)")
    if nm is not None and block % nm[1]:
        block = max(nm[1], block // nm[1] * nm[1])  # N:M groups must not straddle lazy blocks
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, damp_used = _upper_chol_inverse(H, damp, max_damp_tries, where)
    U = U.to(torch.float32)
    d = U.diagonal()

    keep = torch.ones(N, K, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1)
        pruned = torch.zeros(N, i2 - i1, dtype=torch.bool)
        if nm is None:
            saliency = W1.square() / d[i1:i2].square().unsqueeze(0)
            n_prune = int(sparsity * saliency.numel())
            if n_prune:
                order = torch.argsort(saliency.flatten(), stable=True)[:n_prune]
                pruned.view(-1)[order] = True
        for i in range(i2 - i1):
            j = i1 + i
            if nm is not None and i % nm[1] == 0:
                n_keep, m = nm
                saliency = W1[:, i:i + m].square() / d[j:j + m].square().unsqueeze(0)
                low = saliency.topk(m - n_keep, dim=1, largest=False).indices
                pruned[:, i:i + m].scatter_(1, low, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[j]
            loss += err.double().square().sum()
            W1[:, i:] -= err.unsqueeze(1) * U[j, j:i2].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = ~pruned
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    diag = {"damp_used": damp_used, "loss": float(loss), "dead_columns": int(dead.sum())}
    log.debug("SparseGPT %s: %s", where, diag)
    return W * keep, keep, diag
