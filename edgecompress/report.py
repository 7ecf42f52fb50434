"""Readable summaries (rich tables on stderr) of run reports, checks and benchmarks."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .progress import console


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def print_metrics(d: dict[str, Any], title: str | None = None) -> None:
    t = Table(title=title, show_header=False)
    for k, v in d.items():
        if isinstance(v, (dict, list)) and not v:
            continue
        t.add_row(k, _fmt(v) if not isinstance(v, (dict, list)) else str(v))
    console.print(t)


def print_report(report: dict[str, Any]) -> None:
    t = Table(title=f"{report['recipe']}: exports ({report['out']})")
    bench = report.get("bench", {})
    encoder = any("sentences_s" in b for b in bench.values())
    speed = ("sentences/s", "tokens/s") if encoder else ("prefill tok/s", "decode tok/s")
    keys = ("sentences_s", "tokens_s") if encoder else ("prefill_tok_s", "decode_tok_s")
    for col in ("export", "MB", "bits/w", *speed, "RSS MB"):
        t.add_column(col, justify="right")
    for name, e in report["exports"].items():
        b = bench.get(name, {})
        t.add_row(name + (" (ref)" if e.get("reference") else ""), _fmt(e["size_mb"]),
                  _fmt(e.get("bits_per_weight")), _fmt(b.get(keys[0])), _fmt(b.get(keys[1])),
                  _fmt(b.get("peak_rss_mb")))
    console.print(t)
    if "check" in report:
        c = report["check"]
        status = "[green]passed[/]" if c["passed"] else f"[red]FAILED[/] ({'; '.join(c['failures'])})"
        if "cosine_mean" in c:
            what = (f"{c['sentences']} held-out sentences of {c['data']}): embedding cosine mean "
                    f"{c['cosine_mean']:.5f}, worst {c['cosine_worst']:.5f}, nearest-neighbour agreement "
                    f"{c.get('neighbor_agreement', float('nan')):.4f}")
        elif "images" in c:
            what = (f"{c['images']} held-out images of {c['data']}): top-1 agreement {c['top1_agreement']:.4f}, "
                    f"top-5 agreement {c['top5_agreement']:.4f}")
        else:
            what = (f"{c['tokens']} held-out tokens of {c['data']}): perplexity {c['perplexity']:.3f} vs "
                    f"{c['reference_perplexity']:.3f} (ratio {c['perplexity_ratio']:.4f}), KL {c['kl']:.4f}, "
                    f"top-1 agreement {c['top1_agreement']:.4f}")
        console.print(f"check of [bold]{c['export']}[/] on {c['runtime']} ({what} -> {status}", highlight=False)
    console.print(f"timings: {report['timings']}, peak RSS {report.get('peak_rss_mb', '-')} MB", highlight=False)
    console.print(f"report: {report['out']}/report.json", highlight=False)
