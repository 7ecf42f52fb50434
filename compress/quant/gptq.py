"""GPTQ: Hessian-aware weight quantization with error feedback, into the RTN block layout.

Pure core: :func:`gptq_quantize` takes a weight ``[N, K]`` and the input Hessian
``H = (1/n) sum_t x_t x_t^T`` from ``HessianObserver`` (no factor 2: it cancels in the update,
and damping is relative to ``mean(diag(H))``). The result is packed exactly as
:func:`~edgecompress.compress.quant.formats.quantize_blockwise` packs it (contiguous groups of
``scheme.block_size`` along K), so every exporter of that format works unchanged.

``H`` must be averaged over at least K tokens (in practice many more) to have full rank; with
fewer it is singular and only damping keeps it invertible. Supplying enough calibration data
is the caller's job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .formats import BlockQuantizedTensor, QuantScheme, _round_scales, block_scales, decode, encode, pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    block: int = 128  # columns per lazy-batch update (GPTQ's blocksize); independent of the quantization group
    act_order: bool = False  # process columns by decreasing diag(H), with static (up-front) group scales
    max_damp_tries: int = 6  # Cholesky attempts, damp x10 after each failure (each one logged as a warning)
    refit_scales: bool = False  # after rounding: least-squares refit of each row's group scales (see refit_scales)
    float_targets: float = 0.0  # sequential GPTQ: how far to fit the float model's outputs (float_target_weight alpha)

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0 (it is escalated multiplicatively), got {self.damp}")
        if not 0.0 <= self.float_targets <= 1.0:
            raise ValueError(f"float_targets is a fraction in [0, 1], got {self.float_targets}")
        if self.block < 1 or self.max_damp_tries < 1:
            raise ValueError("block and max_damp_tries must be >= 1")


def layer_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``trace((Wq - W) H (Wq - W)^T) / N``: expected squared output error per output row."""
    d = (Wq.double() - W.double())
    return float(((d @ H.double()) * d).sum() / W.shape[0])


def float_target_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float,
                        alpha: float = 1.0) -> torch.Tensor:
    """The weight GPTQ should round when the layer's inputs drifted from the float model's.

    Sequential GPTQ sees each layer's inputs ``x`` as computed by the already-quantized earlier
    layers, while the float model fed it ``f``. The output error worth minimising is
    ``E||W f - Q x||^2`` (GPTAQ's asymmetric calibration, Li et al. 2025, "GPTAQ: Efficient
    Finetuning-Free Quantization for Asymmetric Calibration"). With ``H = E[x x^T]`` and
    ``C = E[f x^T]`` it equals ``const + tr((Q - V) H (Q - V)^T)`` for the least-squares weight
    ``V = W C H^-1``: so GPTQ of ``V`` on ``H`` minimises it. Ridge toward ``W`` keeps ``V`` tame
    along directions the calibration data barely excites: ``V = W (C + l I)(H + l I)^-1`` with
    ``l = damp * mean(diag H)``; ``V = W`` exactly when ``f = x``. ``alpha`` in ``[0, 1]`` goes part
    of the way, ``C <- alpha C + (1 - alpha) H`` (as GPTAQ's own scaling of its asymmetric term):
    the full fit assumes the drift is noise to undo, and on SmolLM2 it overshoots (perplexity 2.8x
    at alpha 1 against 1.10x plain; 1.09x at 0.25).
    """
    if H.shape != C.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"float targets need W [N, K], H and C [K, K]; got {tuple(W.shape)}, "
                         f"{tuple(H.shape)}, {tuple(C.shape)}")
    H64, C64 = H.double(), C.double()
    ridge = damp * float(H64.diagonal().mean()) * torch.eye(H64.shape[0], dtype=torch.float64)
    C64 = alpha * C64 + (1.0 - alpha) * H64
    Vt = torch.linalg.solve(H64 + ridge, (C64 + ridge).T @ W.double().T)  # H symmetric
    return Vt.T.to(W.dtype).contiguous()


def _upper_chol_inverse(H: torch.Tensor, damp: float, tries: int, where: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64), escalating ``damp``."""
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    mean_diag = float(H.diagonal().mean())
    for attempt in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if attempt + 1 < tries:
            log.warning("GPTQ %s: Hessian not positive definite with damp=%g; retrying with damp=%g",
                        where, damp, damp * 10)
        damp *= 10
    raise ValueError(f"GPTQ {where}: Hessian is not positive definite even with damp={damp / 10:g} "
                     f"after {tries} tries (too few calibration tokens, or a corrupt Hessian?)")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig(), *,
                  clip: float | torch.Tensor = 1.0,
                  keep: torch.Tensor | None = None) -> tuple[BlockQuantizedTensor, dict]:
    """GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers"; cf. IST-DASLab/gptq ``fasterquant``) of ``W [N, K]`` given ``H [K, K]``.

    Columns are quantized one at a time on the ``scheme`` grid; each column's scaled error
    ``err_j = (w_j - q_j) / U_jj`` is fed back into the not-yet-quantized columns,
    ``W[:, j+1:] -= err_j (x) U[j, j+1:]``, with ``U`` the upper Cholesky factor of ``Hinv``
    (lazily, every ``cfg.block`` columns). Group scales (``scheme.block_size`` columns along K,
    0 = whole row) are taken, like ``block_scales`` with ``clip`` (scalar or ``[N, n_groups]``),
    from the current error-updated weights when the sweep reaches the group; with
    ``cfg.act_order`` they are "static": all computed up front from the original ``W``.
    Dead inputs (``H_ii == 0``) get ``H_ii = 1`` and zero weights.

    ``keep`` (bool ``[N, K]``, from a sparsify step) pins the pruned weights: they are coded as
    the code of 0 (``zp``), so they dequantize to exactly 0 whatever the error feedback wrote into
    them, and their error ``w_ij - 0`` is fed forward like any rounding error (SparseGPT's joint
    sparsity + quantization); group scales are taken over the kept weights only.

    Returns the packed tensor and ``{"damp_used", "loss", "dead_columns"}``: ``damp_used`` is the
    relative damping that succeeded; ``loss = sum_j ||w_j - q_j||^2 / U_jj^2``, which equals
    ``trace(dW H' dW^T)`` for the damped Hessian ``H'``.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"GPTQ needs W [N, K] and H [K, K], got {tuple(W.shape)} and {tuple(H.shape)}")
    N, K = W.shape
    where = f"layer [N={N}, K={K}]"
    for name, t in (("Hessian", H), ("weight", W)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"GPTQ {where}: the {name} has non-finite values (NaN/inf)")
    G = scheme.block_size or K
    n_groups = math.ceil(K / G)
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # the weight the refit fits the rounded codes to (pruned weights are exactly 0 there)
    W_target = (W.clone() if keep is None else W * keep.to(torch.float32)) if cfg.refit_scales else None
    if isinstance(clip, torch.Tensor) and clip.dim() > 0:
        clip = torch.broadcast_to(clip.to(torch.float32), (N, n_groups))
    if keep is not None and keep.shape != (N, K):
        raise ValueError(f"GPTQ {where}: keep mask {tuple(keep.shape)} does not match the weight")
    kept = torch.ones(N, n_groups * G) if keep is None else torch.zeros(N, n_groups * G)
    if keep is not None:
        kept[:, :K] = keep.to(torch.float32)

    def group_scales(cols: torch.Tensor, g: slice):  # cols [N, n*G] (zero-padded) -> scales/zp [N, n]
        c = clip[:, g] if isinstance(clip, torch.Tensor) and clip.dim() > 0 else clip
        return block_scales(cols.view(N, -1, G), scheme, c)

    if cfg.act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        padded = torch.zeros(N, n_groups * G)
        padded[:, :K] = W
        scales, zp = group_scales(padded * kept, slice(None))
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(K)
        scales = torch.zeros(N, n_groups)
        zp = None if scheme.symmetric else torch.zeros(N, n_groups)
    group_of = (perm // G).tolist()

    U, damp = _upper_chol_inverse(H, cfg.damp, cfg.max_damp_tries, where)
    U = U.to(torch.float32)
    codes = torch.empty(N, K)
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, K, cfg.block):
        i2 = min(i1 + cfg.block, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1)
        for i in range(i2 - i1):
            j, g = i1 + i, group_of[i1 + i]
            if not cfg.act_order and j % G == 0:  # group starts: scales from its current weights
                ge = min(j + G, K)
                cur = torch.zeros(N, G)
                cur[:, : min(ge, i2) - j] = W1[:, i: min(ge, i2) - i1]
                if ge > i2:  # beyond this lazy block: apply the pending updates now
                    cur[:, i2 - j: ge - j] = W[:, i2:ge] - Err1[:, :i] @ U[i1:j, i2:ge]
                s, z = group_scales(cur * kept[:, j: j + G], slice(g, g + 1))
                scales[:, g] = s[:, 0]
                if zp is not None:
                    zp[:, g] = z[:, 0]
            s, z = scales[:, g], None if zp is None else zp[:, g]
            w = W1[:, i]
            c = encode((w * kept[:, perm[j]]).unsqueeze(-1), s, z, scheme.bits)  # pruned: the code of 0
            q = decode(c, s, z, scheme.bits).squeeze(-1)
            codes[:, j] = c.squeeze(-1)
            err = (w - q) / U[j, j]
            loss += err.double().square().sum()
            W1[:, i + 1:] -= err.unsqueeze(1) * U[j, j + 1: i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    out = encode(torch.zeros(N, n_groups, G), scales, zp, scheme.bits)  # padding: the code of 0, as RTN
    out.view(N, -1)[:, perm] = codes
    diag = {"damp_used": damp, "loss": float(loss), "dead_columns": int(dead.sum())}
    if cfg.refit_scales:
        inv = perm.argsort()
        unit = decode(out, torch.ones_like(scales), zp, scheme.bits).view(N, -1)[:, :K]
        scales, before, after = refit_scales(W_target, H[inv][:, inv], unit, scales, G, scheme.scale_dtype)
        diag.update(refit_error_before=before, refit_error_after=after)
    log.debug("GPTQ %s: %s", where, diag)
    return pack(out, scales, zp, scheme, (N, K)), diag


@torch.no_grad()
def refit_scales(W: torch.Tensor, H: torch.Tensor, unit: torch.Tensor, scales: torch.Tensor, G: int,
                 scale_dtype: str = "float16", *, rows: int = 4096) -> tuple[torch.Tensor, float, float]:
    """Least-squares group scales for fixed integer codes: the best ``s`` for what GPTQ rounded.

    With the codes fixed, the dequantized row ``n`` is ``sum_g s_ng * u_ng`` (``u_ng`` the
    row's zero-point-centred codes in group ``g``, zero elsewhere), linear in its scales, so the
    layer's output error ``(w_n - U_n s_n) H (w_n - U_n s_n)^T`` is minimised exactly by
    ``(U_n^T H U_n) s_n = U_n^T H w_n`` — one ``n_groups x n_groups`` system per row. GPTQ chose
    each scale before rounding the group's codes (from the group's peak); refitting after
    rounding recovers part of the rounding error at no storage cost (the same fp16 scale per
    group). A row whose refitted, storage-rounded scales do not lower its error keeps the old
    ones; groups whose codes are all zero keep their scale.

    ``W [N, K]`` is the layer's float weight, ``H [K, K]`` its input Hessian, ``unit [N, K]`` the
    decoded codes with unit scales, ``scales [N, n_groups]``. Returns the new scales and the mean
    per-row output error ``trace(dW H dW^T) / N`` before and after.
    """
    N, K = W.shape
    n_groups = scales.shape[1]
    Kp = n_groups * G
    Hp = torch.zeros(Kp, Kp, dtype=torch.float64)
    Hp[:K, :K] = H.to(torch.float64)
    Hg = Hp.view(Kp, n_groups, G)
    new = scales.clone()
    before = after = 0.0
    for r0 in range(0, N, rows):
        w = torch.zeros(min(rows, N - r0), Kp, dtype=torch.float64)
        u = torch.zeros_like(w)
        w[:, :K] = W[r0: r0 + rows].to(torch.float64)
        u[:, :K] = unit[r0: r0 + rows].to(torch.float64)
        ug = u.view(-1, n_groups, G)
        HU = torch.einsum("kgj,ngj->nkg", Hg, ug)  # [n, Kp, groups]: H @ U_n
        A = torch.einsum("ngj,ngjh->ngh", ug, HU.view(-1, n_groups, G, n_groups))
        wH = w @ Hp
        b = torch.einsum("ngj,ngj->ng", ug, wH.view(-1, n_groups, G))
        wHw = (wH * w).sum(-1)
        empty = A.diagonal(dim1=1, dim2=2) <= 0  # all-zero codes: the scale does not matter; keep it
        old = scales[r0: r0 + rows].to(torch.float64)
        A = A + torch.diag_embed(empty.to(torch.float64))
        b = torch.where(empty, old, b)
        s = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        s = _round_scales(s.to(torch.float32), scale_dtype).to(torch.float64)

        def err(v: torch.Tensor) -> torch.Tensor:
            return wHw - 2 * (v * b).sum(-1) + torch.einsum("ng,ngh,nh->n", v, A, v)

        e_old, e_new = err(old), err(s)
        better = e_new < e_old
        new[r0: r0 + rows] = torch.where(better.unsqueeze(-1), s, old).to(scales.dtype)
        before += float(e_old.sum())
        after += float(torch.minimum(e_old, e_new).sum())
    return new, before / N, after / N
