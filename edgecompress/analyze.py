"""``edgecompress analyze``: where a model's activations, layers and weights stand, before compressing it.

Three measurements on calibration windows, the ones the compression steps decide from:

* **activation magnitudes** at the four thresholded inputs of every decoder block (the inputs of
  q/k/v, o_proj, gate/up and down_proj; see :mod:`edgecompress.compress.sparse.activation`): a
  log-spaced histogram of ``|x|`` per block and site, and its quantiles — the TEAL threshold for a
  sparsity ``s`` is the ``s`` quantile, so the plot shows how far apart the sites' thresholds are;
* **block influence** (ShortGPT, ``1 - mean_t cos(h_in, h_out)``) of every attention and MLP sublayer
  and every whole block, as ``prune_layers`` with ``method: block_influence`` scores them;
* **quantization sensitivity** (optional): the KL of the next-token distribution when only one
  kernel (fused q/k/v, o_proj, fused gate/up, down_proj, the tied head) is quantized with RTN, as
  ``mixed_precision`` measures it.

Writes ``analysis.json`` (every number), one PNG per measurement and ``index.html`` showing them.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import EdgeCompressError

log = logging.getLogger(__name__)

# (label, the module whose input is observed)
SITES = (("attn in (q/k/v)", "self_attn.q_proj"), ("attn out (o_proj)", "self_attn.o_proj"),
         ("mlp in (gate/up)", "mlp.gate_proj"), ("mlp mid (down_proj)", "mlp.down_proj"))
QUANTILES = (0.25, 0.4, 0.5, 0.75, 0.99)
OCTAVE_BINS = 4  # histogram resolution of the plot and the JSON: quarter octaves of |x|


@dataclass(frozen=True)
class AnalyzeConfig:
    data: str = "pydoc:calib"
    samples: int = 8  # calibration windows for the activation histograms
    seq_len: int = 256
    influence_windows: int = 4  # windows the block influence is measured on
    sensitivity: bool = True
    sensitivity_windows: int = 2
    bits: int = 4  # RTN format of the sensitivity probe
    group_size: int = 64

    def __post_init__(self) -> None:
        for key in ("samples", "seq_len", "influence_windows", "sensitivity_windows"):
            if getattr(self, key) < 1:
                raise EdgeCompressError(f"analyze: {key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.bits not in (3, 4, 8):
            raise EdgeCompressError(f"analyze: --bits must be 3, 4 or 8, got {self.bits}")


def activation_histograms(model: nn.Module, windows: torch.Tensor, *, progress: bool = False) -> dict[str, Any]:
    """Per site and block: quantiles of ``|x|`` and its histogram in quarter octaves (fractions of entries)."""
    from edgecompress.compress.calibration.driver import StatRequest, calibrate
    from edgecompress.compress.calibration.observers import LogHistogramObserver
    from edgecompress.compress.prune.layers import decoder_layers

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    names = {f"{prefix}.{i}.{mod}": (label, i) for i, _ in enumerate(layers) for label, mod in SITES}
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    store = calibrate(model, windows, [StatRequest(pattern, "loghist", module_types=(nn.Module,))], progress=progress)
    sites: dict[str, dict[str, Any]] = {label: {"module": mod, "blocks": []} for label, mod in SITES}
    lo_octave = 0.0
    for name, (label, i) in names.items():
        if (name, "loghist") not in store.entries:  # a removed sublayer (pruned model) has no input
            continue
        obs = LogHistogramObserver.from_state(store.get(name, "loghist"), store.counts.get((name, "loghist"), 0))
        lo_octave, per_octave = obs.lo, obs.bins / (obs.hi - obs.lo)
        step = int(round(per_octave / OCTAVE_BINS))
        coarse = obs.hist.reshape(-1, step).sum(1)
        total = float(obs.hist.sum())
        nz = np.nonzero(coarse)[0]
        sites[label]["blocks"].append({
            "block": i, "entries": int(total),
            "quantiles": {str(q): obs.quantile(q) for q in QUANTILES},
            "max": float(2.0 ** (obs.lo + (nz[-1] + 1) / OCTAVE_BINS)),
            "hist": (coarse / total).tolist()})
    if not any(site["blocks"] for site in sites.values()):
        raise EdgeCompressError("analyze: no decoder linear input was observed", hint="is this a Llama-family decoder?")
    # the plotted range: bins holding at least 1e-5 of some block's entries (bin 0 also collects exact zeros)
    rows = np.array([b["hist"] for site in sites.values() for b in site["blocks"]])
    used = np.nonzero(rows.max(0) >= 1e-5)[0]
    lo_edge, hi_edge = int(used[0]), int(used[-1])
    for site in sites.values():
        for b in site["blocks"]:
            b["below_range"] = float(sum(b["hist"][:lo_edge]))
            b["hist"] = b["hist"][lo_edge: hi_edge + 1]
    return {"log2_edges": [lo_octave + k / OCTAVE_BINS for k in range(lo_edge, hi_edge + 2)], "sites": sites}


def influence(model: nn.Module, windows: torch.Tensor) -> dict[str, Any]:
    """Block influence of every present sublayer and every whole block."""
    from edgecompress.compress.prune.layers import present_sublayers, sublayer_name
    from edgecompress.compress.prune.scores import SublayerChain, block_influence

    chain = SublayerChain(model, windows)
    present = present_sublayers(model)
    units = [(s,) for s in present] + [(2 * i, 2 * i + 1) for i in range(chain.n // 2)
                                         if 2 * i in present and 2 * i + 1 in present]
    scores = block_influence(chain, units)
    return {"sublayers": [{"sublayer": sublayer_name(u[0]), "index": u[0], "score": scores[u]} for u in units if len(u) == 1],
            "blocks": [{"block": u[0] // 2, "score": scores[u]} for u in units if len(u) == 2]}


def sensitivity(model: nn.Module, windows: torch.Tensor, bits: int, group_size: int, *,
                progress: bool = False) -> dict[str, Any]:
    """KL per kernel with only that kernel quantized (RTN, symmetric, ``bits``/``group_size``)."""
    from edgecompress.compress.quant.formats import QuantScheme
    from edgecompress.compress.quant.mixed import find_units, measure_sensitivity

    units = find_units(model)
    scheme = QuantScheme(bits=bits, block_size=group_size, symmetric=True)
    kl = measure_sensitivity(model, windows, units, scheme, progress=progress)
    return {"format": f"int{bits} g{group_size} symmetric RTN",
            "units": [{"unit": u.name, "params": u.params, "kl": kl[u.name]} for u in units]}


def analyze(model: nn.Module, tokenizer: Any, cfg: AnalyzeConfig, *, progress: bool = False) -> dict[str, Any]:
    from .data import load_text, token_windows

    if tokenizer is None:
        raise EdgeCompressError("analyze needs a causal LM with a tokenizer", hint="run it on a decoder such as "
                                "smollm2-135m or tiny-llama")
    windows = token_windows(tokenizer, load_text(cfg.data), cfg.seq_len, cfg.samples)
    model.eval()
    with torch.no_grad():
        out: dict[str, Any] = {"config": asdict(cfg), "windows": int(len(windows)), "seq_len": int(windows.shape[1])}
        out["activations"] = activation_histograms(model, windows, progress=progress)
        out["influence"] = influence(model, windows[: cfg.influence_windows])
        if cfg.sensitivity:
            out["sensitivity"] = sensitivity(model, windows[: cfg.sensitivity_windows], cfg.bits, cfg.group_size,
                                             progress=progress)
    return out


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise EdgeCompressError("analyze draws its plots with matplotlib, which is not installed",
                                hint="pip install -c constraints.txt '.[plot]' (scripts/setup.sh installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_activations(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    act = result["activations"]
    edges = np.asarray(act["log2_edges"])
    fig, axes = plt.subplots(1, len(SITES), figsize=(5 * len(SITES), 5), sharey=True, squeeze=False)
    for ax, (label, _) in zip(axes[0], SITES):
        blocks = act["sites"][label]["blocks"]
        if not blocks:
            ax.set_title(f"{label}\n(no block has it)")
            continue
        grid = np.array([b["hist"] for b in blocks])
        rows = [b["block"] for b in blocks]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma",
                       extent=(edges[0], edges[-1], rows[0] - 0.5, rows[-1] + 0.5))
        for q, style in (("0.4", "c--"), ("0.5", "c-")):
            ax.plot([np.log2(b["quantiles"][q]) for b in blocks], rows, style, lw=1, label=f"{float(q):.0%} quantile")
        ax.set_title(label)
        ax.set_xlabel("log2 |x|")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="fraction of entries")
    axes[0][0].set_ylabel("decoder block")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Activation magnitudes at the thresholded inputs (TEAL threshold for sparsity s = the s quantile)")
    _save(plt, fig, path)


def plot_influence(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    inf = result["influence"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for kind, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
        rows = [r for r in inf["sublayers"] if r["sublayer"].endswith(kind)]
        ax.bar([r["index"] // 2 + (-0.2 if kind == "attn" else 0.2) for r in rows], [r["score"] for r in rows],
               width=0.4, color=color, label=f"{kind} sublayer")
    if inf["blocks"]:
        ax.plot([r["block"] for r in inf["blocks"]], [r["score"] for r in inf["blocks"]], "k.-", label="whole block")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block influence 1 - cos(h_in, h_out)")
    ax.set_title("Block influence (low = removable by block influence alone)")
    ax.legend()
    _save(plt, fig, path)


def plot_sensitivity(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sens = result["sensitivity"]
    units = sens["units"]
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * len(units)), 4.5))
    kinds = {"qkv": "tab:blue", "o_proj": "tab:cyan", "gate_up": "tab:orange", "down_proj": "tab:red"}
    colors = [next((c for k, c in kinds.items() if u["unit"].endswith(k)), "tab:gray") for u in units]
    ax.bar(range(len(units)), [max(u["kl"], 1e-9) for u in units], color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(units)))
    ax.set_xticklabels([u["unit"].replace("model.layers.", "") for u in units], rotation=90, fontsize=6)
    ax.set_ylabel("KL to the float model")
    ax.set_title(f"Sensitivity: only this kernel quantized ({sens['format']})")
    _save(plt, fig, path)


def write_report(result: dict[str, Any], dest: Path) -> list[str]:
    """``analysis.json``, the PNGs and ``index.html`` into the (existing, empty) folder ``dest``."""
    files = {"activations.png": plot_activations, "influence.png": plot_influence}
    if "sensitivity" in result:
        files["sensitivity.png"] = plot_sensitivity
    for name, fn in files.items():
        fn(result, dest / name)
    (dest / "analysis.json").write_text(json.dumps(result, indent=1))
    rows = sorted(result["influence"]["sublayers"], key=lambda r: r["score"])[:8]
    table = "".join(f"<tr><td>{html.escape(r['sublayer'])}</td><td>{r['score']:.4g}</td></tr>" for r in rows)
    extra = ""
    if "sensitivity" in result:
        top = sorted(result["sensitivity"]["units"], key=lambda u: -u["kl"])[:8]
        extra = ("<h2>Most sensitive kernels</h2><table><tr><th>kernel</th><th>KL</th></tr>"
                 + "".join(f"<tr><td>{html.escape(u['unit'])}</td><td>{u['kl']:.4g}</td></tr>" for u in top)
                 + "</table>")
    imgs = "".join(f'<p><img src="{n}" style="max-width:100%"></p>' for n in files)
    (dest / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>edgecompress analyze: {html.escape(str(result.get('model')))}</title>"
        f"<h1>{html.escape(str(result.get('model')))}</h1><p>{result['windows']} windows of {result['seq_len']} tokens "
        f"of {html.escape(result['config']['data'])}</p>{imgs}<h2>Lowest block influence</h2>"
        f"<table><tr><th>sublayer</th><th>influence</th></tr>{table}</table>{extra}")
    return [*files, "analysis.json", "index.html"]
