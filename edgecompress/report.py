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
    for col in ("export", "MB", "bits/w", "prefill tok/s", "decode tok/s", "RSS MB"):
        t.add_column(col, justify="right")
    bench = report.get("bench", {})
    for name, e in report["exports"].items():
        b = bench.get(name, {})
        t.add_row(name + (" (ref)" if e.get("reference") else ""), _fmt(e["size_mb"]),
                  _fmt(e.get("bits_per_weight")), _fmt(b.get("prefill_tok_s")),
                  _fmt(b.get("decode_tok_s")), _fmt(b.get("peak_rss_mb")))
    console.print(t)
    if "check" in report:
        c = report["check"]
        status = "[green]passed[/]" if c["passed"] else f"[red]FAILED[/] ({'; '.join(c['failures'])})"
        console.print(f"check of [bold]{c['export']}[/] on {c['runtime']} ({c['tokens']} held-out tokens of {c['data']}): "
                      f"perplexity {c['perplexity']:.3f} vs {c['reference_perplexity']:.3f} "
                      f"(ratio {c['perplexity_ratio']:.4f}), KL {c['kl']:.4f}, top-1 agreement {c['top1_agreement']:.4f} "
                      f"-> {status}", highlight=False)
    console.print(f"timings: {report['timings']}", highlight=False)
    console.print(f"report: {report['out']}/report.json", highlight=False)
