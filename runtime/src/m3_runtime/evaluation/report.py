"""``m3 eval``'s outputs: the text table (the model README's shape: a block per variant,
a row per mode, a column per metric), and a self-contained HTML report with plots."""

from __future__ import annotations

import html
import io
from typing import Any


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def _delta(d: dict[str, float] | None) -> str:
    return "" if d is None else f"{100 * d['delta']:+.1f}" + ("*" if d["p_value"] < 0.05 else "")


def _interval(d: dict[str, float] | None) -> str:
    return "" if d is None else f"[{100 * d['ci_low']:+.1f},{100 * d['ci_high']:+.1f}]"


def table(result: dict[str, Any]) -> str:
    """Metrics x100, as the BGE-M3 README prints them; deltas vs fp32 with their 95% interval."""
    lines = [
        f"{result['data']} ({result['split']}): {result['queries']} queries, {result['corpus']} passages"
        + (
            f", {result['dropped_queries']} queries without a relevant passage left out"
            if result["dropped_queries"]
            else ""
        )
    ]
    names = list(result["results"][0]["metrics"]) if result["results"] else []
    mode_width = max([len("mode"), *(len(r["mode"]) for r in result["results"])])
    deltas = {(d["variant"], d["mode"], d["metric"]): d for d in result["deltas"]}
    for variant in dict.fromkeys(r["variant"] for r in result["results"]):
        lines.append("")
        lines.append(
            f"[{variant}]"
            + (
                "  (delta vs fp32 [95% bootstrap interval], * p < 0.05 paired t-test)"
                if variant != "fp32" and deltas
                else ""
            )
        )
        lines.append(f"{'mode':<{mode_width}}  " + "  ".join(f"{n:>13}" for n in names))
        for r in (r for r in result["results"] if r["variant"] == variant):
            lines.append(f"{r['mode']:<{mode_width}}  " + "  ".join(f"{_fmt(r['metrics'][n]):>13}" for n in names))
            row = [deltas.get((variant, r["mode"], n)) for n in names]
            if any(row):
                lines.append(f"{'':<{mode_width}}  " + "  ".join(f"{_delta(d):>13}" for d in row))
                lines.append(f"{'':<{mode_width}}  " + "  ".join(f"{_interval(d):>13}" for d in row))
    tune = result.get("tune")
    if tune:
        gain = tune["test"]["gain"]
        lines += [
            "",
            f"--tune ({tune['variant']}, {tune['objective']} on {tune['dev_split']}): best {tune['best']} "
            f"({_fmt(tune['dev']['best'])} vs {_fmt(tune['dev']['default'])} at 0.4,0.2,0.4)",
            f"  on {tune['test_split']}: {_fmt(tune['test']['best'][tune['objective']])} vs "
            f"{_fmt(tune['test']['default'][tune['objective']])}, gain {100 * gain['delta']:+.1f} "
            f"[{100 * gain['ci_low']:+.1f}, {100 * gain['ci_high']:+.1f}] (p {gain['p_value']:.3g})",
        ]
    return "\n".join(lines)


def html_report(result: dict[str, Any]) -> str:
    """One HTML file: the table, and a bar chart per metric (SVG inline; needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .metrics import MissingExtra

        raise MissingExtra('--report needs matplotlib: pip install "m3-runtime[report]"') from None
    names = list(result["results"][0]["metrics"]) if result["results"] else []
    variants = list(dict.fromkeys(r["variant"] for r in result["results"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["results"]))
    value = {(r["variant"], r["mode"]): r["metrics"] for r in result["results"]}
    svgs = []
    for name in names:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(modes) * len(variants)), 3.0))
        width = 0.8 / max(len(variants), 1)
        for j, variant in enumerate(variants):
            xs = [i + j * width for i in range(len(modes))]
            ys = [value.get((variant, m), {}).get(name, 0.0) for m in modes]
            ax.bar(xs, ys, width=width, label=variant)
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(modes))])
        ax.set_xticklabels(modes)
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
        svg = buf.getvalue()
        svgs.append(svg[svg.index("<svg") :])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>m3 eval</title>"
        "<style>body{font-family:sans-serif;margin:2em} pre{background:#f6f6f6;padding:1em}</style></head><body>"
        f"<h1>m3 eval: {html.escape(result['data'])} ({html.escape(result['split'])})</h1>"
        f"<pre>{html.escape(table(result))}</pre>" + "".join(f"<div>{s}</div>" for s in svgs) + "</body></html>"
    )


def manifest_lines(record: dict[str, Any]) -> list[str]:
    """``m3 info``'s lines for the manifest's ``retrieval_eval`` (written by m3-export --eval)."""
    metric = record.get("metric", "ndcg@10")
    lines = [
        f"retrieval    {metric} on {record.get('data')} ({record.get('split')}: {record.get('queries')} queries, "
        f"{record.get('corpus')} passages), bound: a drop of at most {record.get('max_ndcg_drop')} vs fp32"
    ]
    deltas = {(d["variant"], d["mode"]): d for d in record.get("deltas", [])}
    for r in record.get("results", []):
        value = r["metrics"].get(metric)
        if value is None:
            continue
        d = deltas.get((r["variant"], r["mode"]))
        vs = "" if d is None else f" ({d['delta']:+.4f} vs fp32, 95% [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}])"
        lines.append(f"  {r['variant']:5} {r['mode']:13} {value:.4f}{vs}")
    for name, why in record.get("not_evaluated", {}).items():
        lines.append(f"  {name:5} not evaluated at export: {why}")
    if record.get("over_bound"):
        lines.append("  OVER THE BOUND (kept with --keep-anyway): " + ", ".join(record["over_bound"]))
    return lines
