"""Streaming activation statistics: pure cores that see tensors, never modules.

Every observer takes batches ``x`` of shape ``[..., C]`` (channels = last dim; leading
dims are flattened into tokens), keeps ``count`` = tokens seen, and exposes
``state()`` -> ``{name: float32 tensor}`` on the CPU. ``from_state(state, count)`` and
``merge`` let a saved store be reloaded and extended. Running sums are kept in float64
and reported as float32 means, so batch sizes and order do not matter.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import numpy as np
import torch

T = TypeVar("T", bound="Observer")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """View ``[..., C]`` as ``[tokens, C]`` float32 (detached)."""
    if x.dim() == 0:
        raise ValueError("an observer needs activations with a channel dimension, got a scalar")
    if not torch.is_floating_point(x):
        raise TypeError(f"an observer needs floating-point activations, got {x.dtype}")
    return x.detach().reshape(-1, x.shape[-1]).float()


class Observer(ABC):
    """Base class: a streaming statistic with a serialisable float32 state."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.count = 0

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Accumulate one batch of activations ``[..., C]``."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The statistic as float32 CPU tensors (means, not sums)."""

    @abstractmethod
    def merge(self: T, other: T) -> T:
        """Fold ``other`` (same kind, same channels) into ``self``; returns ``self``."""

    @classmethod
    @abstractmethod
    def from_state(cls: type[T], state: dict[str, torch.Tensor], count: int) -> T:
        """Rebuild an observer from ``state()`` and ``count``."""


class MinMaxObserver(Observer):
    """Per-channel min, max and absmax; per-tensor values are their reductions."""

    name = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        if x.shape[0] == 0:
            return
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if self.min is None or self.max is None:
            raise ValueError("MinMaxObserver has seen no data")
        lo, hi = self.min.cpu(), self.max.cpu()
        return {"min": lo.clone(), "max": hi.clone(), "absmax": torch.maximum(lo.abs(), hi.abs())}

    def tensor_min(self) -> float:
        """Minimum over all channels."""
        return float(self.state()["min"].min())

    def tensor_max(self) -> float:
        """Maximum over all channels."""
        return float(self.state()["max"].max())

    def tensor_absmax(self) -> float:
        """Largest magnitude over all channels."""
        return float(self.state()["absmax"].max())

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        if other.min is None or other.max is None:
            return self
        if self.min is None or self.max is None:
            self.min, self.max = other.min.clone(), other.max.clone()
        else:
            self.min = torch.minimum(self.min, other.min.to(self.min.device))
            self.max = torch.maximum(self.max, other.max.to(self.max.device))
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> MinMaxObserver:
        obs = cls()
        obs.min, obs.max = state["min"].float().clone(), state["max"].float().clone()
        obs.count = int(count)
        return obs


class MeanSquareObserver(Observer):
    """Per-channel running mean of x² (``meansq``) and of |x| (``meanabs``).

    ``meansq[j] * count`` is Wanda's squared input norm ‖X_j‖²; ``meanabs`` is AWQ's
    activation magnitude.
    """

    name = "meansq"

    def __init__(self) -> None:
        super().__init__()
        self.sq_sum: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _tokens(x).double()
        if x.shape[0] == 0:
            return
        sq, ab = x.square().sum(dim=0), x.abs().sum(dim=0)
        if self.sq_sum is None or self.abs_sum is None:
            self.sq_sum, self.abs_sum = sq, ab
        else:
            self.sq_sum += sq
            self.abs_sum += ab
        self.count += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if self.sq_sum is None or self.abs_sum is None or self.count == 0:
            raise ValueError("MeanSquareObserver has seen no data")
        return {
            "meansq": (self.sq_sum / self.count).float().cpu(),
            "meanabs": (self.abs_sum / self.count).float().cpu(),
        }

    def merge(self, other: MeanSquareObserver) -> MeanSquareObserver:
        if other.sq_sum is None or other.abs_sum is None:
            return self
        if self.sq_sum is None or self.abs_sum is None:
            self.sq_sum, self.abs_sum = other.sq_sum.clone(), other.abs_sum.clone()
        else:
            self.sq_sum += other.sq_sum.to(self.sq_sum.device)
            self.abs_sum += other.abs_sum.to(self.abs_sum.device)
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> MeanSquareObserver:
        obs = cls()
        obs.sq_sum = state["meansq"].double() * count
        obs.abs_sum = state["meanabs"].double() * count
        obs.count = int(count)
        return obs


class HessianObserver(Observer):
    """Running mean of x xᵀ over tokens: ``hessian = (1/n) Σ_t x_t x_tᵀ``, shape [C, C].

    Convention: NO factor 2. GPTQ's ``add_batch`` keeps ``(2/n) Σ x xᵀ`` (the Hessian
    of the squared layer error); the factor cancels in GPTQ's update and its damping
    is relative to the mean diagonal, so a GPTQ core may use this matrix as is (or
    multiply by 2 to match the paper literally). Each batch's XᵀX is computed in
    float32 and summed across batches in float64.
    """

    name = "hessian"

    def __init__(self) -> None:
        super().__init__()
        self.sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        if x.shape[0] == 0:
            return
        xtx = (x.T @ x).double()
        if self.sum is None:
            self.sum = xtx
        else:
            self.sum += xtx
        self.count += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if self.sum is None or self.count == 0:
            raise ValueError("HessianObserver has seen no data")
        return {"hessian": (self.sum / self.count).float().cpu()}

    def merge(self, other: HessianObserver) -> HessianObserver:
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum = other.sum.clone()
        else:
            self.sum += other.sum.to(self.sum.device)
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> HessianObserver:
        obs = cls()
        obs.sum = state["hessian"].double() * count
        obs.count = int(count)
        return obs


class MeanObserver(Observer):
    """Per-channel running mean of x (``mean``): a prompt set's mean activation (steering)."""

    name = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _tokens(x).double()
        if x.shape[0] == 0:
            return
        s = x.sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s.to(self.sum.device)
        self.count += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if self.sum is None or self.count == 0:
            raise ValueError("MeanObserver has seen no data")
        return {"mean": (self.sum / self.count).float().cpu()}

    def merge(self, other: MeanObserver) -> MeanObserver:
        if other.sum is None:
            return self
        self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum.to(self.sum.device)
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> MeanObserver:
        obs = cls()
        obs.sum = state["mean"].double() * count
        obs.count = int(count)
        return obs


class RowsObserver(Observer):
    """Every row it sees, in order (``rows`` [count, C]): per-prompt activations for paired
    statistics (steering's PCA of paired differences). Memory grows with the data: meant for
    prompt sets pooled to one row per prompt (``StatRequest(tokens="last"|"mean")``)."""

    name = "rows"

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        if x.shape[0] == 0:
            return
        self.chunks.append(x.cpu().clone())
        self.count += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if not self.chunks:
            raise ValueError("RowsObserver has seen no data")
        return {"rows": torch.cat(self.chunks)}

    def merge(self, other: RowsObserver) -> RowsObserver:
        self.chunks += [c.clone() for c in other.chunks]
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> RowsObserver:
        obs = cls()
        obs.chunks = [state["rows"].float().clone()]
        obs.count = int(count)
        return obs


def rebin(hist: np.ndarray, upper: float, new_upper: float) -> np.ndarray:
    """Re-bin a histogram over ``[0, upper]`` into the same number of bins over ``[0, new_upper]``.

    Mass is spread uniformly inside each old bin (proportional redistribution, i.e.
    linear interpolation of the cumulative count); the total is kept. When
    ``new_upper = upper * 2**k`` the new edges fall on old edges and it is exact.
    """
    bins = len(hist)
    cdf = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    old_edges = np.linspace(0.0, upper, bins + 1)
    new_edges = np.minimum(np.arange(bins + 1, dtype=np.float64) * (new_upper / bins), upper)
    new_cdf = np.interp(new_edges, old_edges, cdf)
    new_cdf[-1] = cdf[-1]
    return np.diff(new_cdf)


class HistogramObserver(Observer):
    """Per-tensor histogram of |x| over ``[0, upper]`` with a fixed number of bins.

    ``upper`` starts at the first batch's largest magnitude and, when a batch exceeds
    it, doubles as often as needed; the old histogram is re-binned (:func:`rebin`,
    exact for a power-of-two growth). Quantiles are accurate to one bin width.
    Non-finite values are ignored.
    """

    name = "histogram"

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError("a histogram needs at least 2 bins")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.float64)
        self.upper = 0.0

    @property
    def bin_width(self) -> float:
        """Width of one bin in the current range."""
        return self.upper / self.bins

    def update(self, x: torch.Tensor) -> None:
        rows = _tokens(x)
        a = rows.abs().flatten()
        a = a[torch.isfinite(a)]
        if a.numel():
            top = float(a.max())
            if top > self.upper:
                self._grow(top)
            if self.upper > 0:
                idx = (a * (self.bins / self.upper)).long().clamp_(0, self.bins - 1)
                self.hist += torch.bincount(idx, minlength=self.bins).cpu().double().numpy()
            else:  # everything seen so far is exactly zero: bin 0 of any range
                self.hist[0] += a.numel()
        self.count += rows.shape[0]

    def _grow(self, top: float) -> None:
        top32 = float(np.float32(top))
        if self.upper == 0.0:  # all mass (if any) sits at zero, which stays in bin 0
            self.upper = top32
            return
        new_upper = self.upper * 2.0 ** math.ceil(math.log2(top / self.upper))
        while new_upper < top:
            new_upper *= 2.0
        self.hist = rebin(self.hist, self.upper, new_upper)
        self.upper = new_upper

    def quantile(self, q: float) -> float:
        """Magnitude below which a fraction ``q`` (0..1) of the observed |x| fall."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        total = cdf[-1]
        if total == 0:
            raise ValueError("HistogramObserver has seen no data")
        target = q * total
        i = int(np.searchsorted(cdf, target, side="left"))
        if i == 0:
            return 0.0
        b = min(i, self.bins) - 1
        frac = (target - cdf[b]) / self.hist[b] if self.hist[b] > 0 else 1.0
        return float((b + min(max(frac, 0.0), 1.0)) * self.bin_width)

    def percentile(self, p: float) -> float:
        """Like :meth:`quantile` with ``p`` in percent (0..100)."""
        return self.quantile(p / 100.0)

    def threshold_for_sparsity(self, s: float) -> float:
        """Magnitude threshold that zeroes a fraction ``s`` of entries (TEAL-style)."""
        return self.quantile(s)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "hist": torch.from_numpy(self.hist.astype(np.float32)),
            "upper": torch.tensor([self.upper], dtype=torch.float32),
        }

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        if other.upper > self.upper:
            mine = rebin(self.hist, self.upper, other.upper) if self.upper > 0 else self.hist
            self.hist, self.upper = mine + other.hist, other.upper
        else:
            theirs = rebin(other.hist, other.upper, self.upper) if other.upper > 0 else other.hist
            self.hist = self.hist + theirs
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> HistogramObserver:
        obs = cls(bins=int(state["hist"].numel()))
        obs.hist = state["hist"].double().numpy().copy()
        obs.upper = float(state["upper"].reshape(-1)[0])
        obs.count = int(count)
        return obs


class SignedHistogramObserver(HistogramObserver):
    """Per-tensor histogram of x, kept as two |x| histograms sharing one range: ``hist`` for
    x >= 0 and ``neg`` for x < 0 (growth and re-binning as :class:`HistogramObserver`).

    :meth:`signed` gives the whole distribution over ``[-upper, upper]``, which the
    activation-range searches (percentile, MSE, entropy) of asymmetric quantizers read.
    """

    name = "histogram_signed"

    def __init__(self, bins: int = 2048) -> None:
        super().__init__(bins)
        self.neg = np.zeros(bins, dtype=np.float64)

    def update(self, x: torch.Tensor) -> None:
        rows = _tokens(x)
        v = rows.flatten()
        v = v[torch.isfinite(v)]
        if v.numel():
            top = float(v.abs().max())
            if top > self.upper:
                self._grow(top)
            if self.upper > 0:
                idx = (v.abs() * (self.bins / self.upper)).long().clamp_(0, self.bins - 1)
                idx = torch.where(v < 0, idx + self.bins, idx)  # one bincount: [x >= 0 | x < 0]
                both = torch.bincount(idx, minlength=2 * self.bins).double().numpy()
                self.hist += both[: self.bins]
                self.neg += both[self.bins:]
            else:
                self.hist[0] += v.numel()
        self.count += rows.shape[0]

    def _grow(self, top: float) -> None:
        old = self.upper
        super()._grow(top)  # re-bins self.hist
        if old > 0 and self.upper != old:
            self.neg = rebin(self.neg, old, self.upper)

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts [2*bins], edges [2*bins + 1])`` over ``[-upper, upper]``, ascending."""
        counts = np.concatenate([self.neg[::-1], self.hist])
        return counts, np.linspace(-self.upper, self.upper, 2 * self.bins + 1)

    def state(self) -> dict[str, torch.Tensor]:
        return {**super().state(), "neg": torch.from_numpy(self.neg.astype(np.float32))}

    def merge(self, other: SignedHistogramObserver) -> SignedHistogramObserver:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        upper = max(self.upper, other.upper)

        def at(h: np.ndarray, u: float) -> np.ndarray:
            return rebin(h, u, upper) if 0 < u < upper else h

        self.hist = at(self.hist, self.upper) + at(other.hist, other.upper)
        self.neg = at(self.neg, self.upper) + at(other.neg, other.upper)
        self.upper = upper
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> SignedHistogramObserver:
        obs = super().from_state(state, count)
        obs.neg = state["neg"].double().numpy().copy()
        return obs


class SampleObserver(Observer):
    """A uniform random sample of at most ``max_rows`` input rows (tokens), for searches that
    need real activations (e.g. SmoothQuant's per-site alpha). Priority sampling: every row gets a
    seeded uniform key and the rows with the smallest keys are kept, so merging two samples is
    exact and the result does not depend on batch sizes."""

    name = "sample"

    def __init__(self, max_rows: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.max_rows = max_rows
        self._gen = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)

    def update(self, x: torch.Tensor) -> None:
        rows = _tokens(x).cpu()
        keys = torch.rand(rows.shape[0], generator=self._gen)
        self._keep(rows, keys)
        self.count += rows.shape[0]

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        order = keys.argsort()[: self.max_rows]
        self.rows, self.keys = rows[order].clone(), keys[order].clone()

    def state(self) -> dict[str, torch.Tensor]:
        if self.rows is None:
            raise ValueError("SampleObserver has seen no data")
        return {"rows": self.rows.clone(), "keys": self.keys.clone(),
                "max_rows": torch.tensor([self.max_rows], dtype=torch.float32)}

    def merge(self, other: SampleObserver) -> SampleObserver:
        if other.rows is not None:
            self._keep(other.rows, other.keys)
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> SampleObserver:
        obs = cls(max_rows=int(state["max_rows"].reshape(-1)[0]))
        obs.rows, obs.keys = state["rows"].float().clone(), state["keys"].float().clone()
        obs.count = int(count)
        return obs


class LogHistogramObserver(Observer):
    """Per-tensor histogram of log2|x| over a fixed range of octaves ``[lo, hi)``.

    Why not :class:`HistogramObserver`: activation-sparsity thresholds sit at low quantiles of |x|
    while a few tokens carry magnitudes 1000x larger (massive activations), so a linear histogram
    that spans the maximum has bins wider than the threshold itself. Log-spaced bins keep one
    relative resolution everywhere (``2**(1/bins_per_octave)``, 1.1% by default); the fixed range
    makes merging a plain sum. Magnitudes below ``2**lo`` (exact zeros included) fall in bin 0,
    above ``2**hi`` in the last bin; non-finite values are ignored.
    """

    name = "loghist"

    def __init__(self, bins: int = 4096, lo: float = -32.0, hi: float = 32.0) -> None:
        super().__init__()
        if bins < 2 or not hi > lo:
            raise ValueError(f"need bins >= 2 and hi > lo, got bins={bins}, [{lo}, {hi})")
        self.bins, self.lo, self.hi = bins, float(lo), float(hi)
        self.hist = np.zeros(bins, dtype=np.float64)

    @property
    def ratio(self) -> float:
        """Upper over lower edge of one bin: quantiles are exact to this factor."""
        return 2.0 ** ((self.hi - self.lo) / self.bins)

    def update(self, x: torch.Tensor) -> None:
        rows = _tokens(x)
        a = rows.abs().flatten()
        a = a[torch.isfinite(a)]
        if a.numel():
            pos = (torch.log2(a.double()) - self.lo) * (self.bins / (self.hi - self.lo))
            idx = torch.nan_to_num(pos, neginf=0.0).floor().long().clamp_(0, self.bins - 1)
            self.hist += torch.bincount(idx, minlength=self.bins).double().numpy()
        self.count += rows.shape[0]

    def quantile(self, q: float) -> float:
        """Magnitude below which a fraction ``q`` (0..1) of the observed |x| fall (log-interpolated in its bin)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        if cdf[-1] == 0:
            raise ValueError("LogHistogramObserver has seen no data")
        target = q * cdf[-1]
        if target == 0:
            return 0.0
        b = min(int(np.searchsorted(cdf, target, side="left")), self.bins) - 1
        frac = (target - cdf[b]) / self.hist[b] if self.hist[b] > 0 else 1.0
        return float(2.0 ** (self.lo + (b + min(max(frac, 0.0), 1.0)) * (self.hi - self.lo) / self.bins))

    def threshold_for_sparsity(self, s: float) -> float:
        """Magnitude threshold ``t`` with a fraction ``s`` of the entries at |x| <= t (TEAL-style)."""
        return self.quantile(s)

    def state(self) -> dict[str, torch.Tensor]:
        return {"hist": torch.from_numpy(self.hist.astype(np.float32)),
                "range": torch.tensor([self.lo, self.hi], dtype=torch.float32)}

    def merge(self, other: LogHistogramObserver) -> LogHistogramObserver:
        if (other.bins, other.lo, other.hi) != (self.bins, self.lo, self.hi):
            raise ValueError("cannot merge log histograms with different bins or ranges")
        self.hist = self.hist + other.hist
        self.count += other.count
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], count: int) -> LogHistogramObserver:
        lo, hi = (float(v) for v in state["range"].reshape(-1))
        obs = cls(bins=int(state["hist"].numel()), lo=lo, hi=hi)
        obs.hist = state["hist"].double().numpy().copy()
        obs.count = int(count)
        return obs


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, MeanSquareObserver, HessianObserver, HistogramObserver,
                              SignedHistogramObserver, LogHistogramObserver, SampleObserver, MeanObserver,
                              RowsObserver)
}


def observer_class(stat: str) -> type[Observer]:
    """The observer class for a stat name; a ``"@output"`` suffix (output statistics) is ignored."""
    base = stat.split("@", 1)[0]
    try:
        return OBSERVERS[base]
    except KeyError:
        raise ValueError(f"unknown statistic {stat!r}; known: {', '.join(sorted(OBSERVERS))}") from None
