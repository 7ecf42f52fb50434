"""Static activation calibration for W8A8: attach an :class:`ActQuant` to quantized linears.

Thin adapter over the calibration driver: one pass over the calibration batches gathers the
per-channel min/max (and, for the histogram methods, the signed histogram) of every selected
``QuantLinear``'s input; :func:`~edgecompress.compress.quant.activation.calibrated_act_quant`
turns them into a scale and zero point. Linears sharing one input (q/k/v, gate/up) see the
same statistics and get the same parameters, so a fused export stays exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, calibrate

from .activation import calibrated_act_quant
from .modules import QuantLinear
from .sequential import stat_source

log = logging.getLogger(__name__)


def calibrate_activations(model: nn.Module, batches: Iterable[Any], names: list[str], *, method: str = "minmax",
                          bits: int = 8, per_channel: bool = False, percentile: float = 99.99,
                          progress: bool = False, batch_size: int = 1,
                          tokens: str = "all") -> list[dict[str, Any]]:
    """Calibrate and attach static input quantization to the ``QuantLinear`` modules ``names``.

    ``tokens="after_first"`` leaves each sequence's first token out of the ranges (a float prefix,
    see :mod:`edgecompress.compress.quant.prefix`)."""
    if not names:
        return []
    observed = sorted({stat_source(n) for n in names})  # q/k/v (gate/up) share one input: observe it once
    pattern = "^(?:" + "|".join(re.escape(n) for n in observed) + ")$"
    requests = [StatRequest(pattern, "minmax", module_types=(QuantLinear,), tokens=tokens)]
    if method != "minmax":
        requests.append(StatRequest(pattern, "histogram_signed", module_types=(QuantLinear,), tokens=tokens))
    store = calibrate(model, batches, requests, progress=progress, batch_size=batch_size)
    records = []
    for name in names:
        src = stat_source(name)
        stats = store.get(src, "minmax")
        if method != "minmax":
            stats = {**stats, **store.get(src, "histogram_signed")}
        act = calibrated_act_quant(stats, method, bits=bits, per_channel=per_channel, percentile=percentile)
        model.get_submodule(name).act = act
        records.append({"module": name, "activation": act.to_dict()})
    log.info("W8A8: static %s activation ranges for %d linears", method, len(records))
    return records
