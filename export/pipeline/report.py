"""The build report: report.json, a Markdown table and a PNG plot.

Rows are stages/formats (teacher, student, pruned, each exported candidate).
The plot puts latency on x, the quality metric on y and file size as the marker
area, so the trade-off the build made is visible at a glance.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _fmt_int(n: Any) -> str:
    return "-" if n in (None, 0) else f"{int(n):,}"


def _fmt_size(n: Any) -> str:
    if not n:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _fmt_metric(task: str, v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}%" if task == "classification" else f"{v:.4f}"


def _fmt_ms(lat: Any) -> str:
    if not lat:
        return "-"
    return f"{lat['p50']:.3f} / {lat['p99']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    task = report["task"]
    metric = "accuracy" if task == "classification" else "cosine to teacher"
    lines = [
        f"# {report['name']} {report['version']}: build report",
        "",
        f"Task: {task}. Latency: batch 1, {report.get('threads', 1)} thread(s), "
        "p50 / p99 ms, measured in a child process with the device runtime.",
        "",
        f"| stage | format | {metric} | params | MACs | size | latency ms | selected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    selected = set(report.get("selected", {}).values())
    for row in report["stages"]:
        lines.append(
            f"| {row['stage']} | {row['format']} | {_fmt_metric(task, row.get('metric'))} "
            f"| {_fmt_int(row.get('params'))} | {_fmt_int(row.get('flops'))} "
            f"| {_fmt_size(row.get('size_bytes'))} | {_fmt_ms(row.get('latency_ms'))} "
            f"| {'yes' if row['stage'] in selected else ''} |"
        )
    gates = report.get("gates", [])
    if gates:
        lines += ["", "## Gates", "", "| gate | stage | result | detail |", "|---|---|---|---|"]
        for g in gates:
            lines.append(
                f"| {g['gate']} | {g['stage']} | {'pass' if g['passed'] else 'FAIL'} "
                f"| {g['detail']} |"
            )
    if report.get("prune"):
        p = report["prune"]
        lines += [
            "",
            "## Pruning",
            "",
            f"{p['method']} at ratio {p['ratio']}: params {_fmt_int(p['params_before'])} -> "
            f"{_fmt_int(p['params_after'])} (nonzero {_fmt_int(p['nonzero_after'])}), "
            f"MACs {_fmt_int(p['flops_before'])} -> {_fmt_int(p['flops_after'])}.",
        ]
    if report.get("quantize"):
        q = report["quantize"]
        lines += ["", "## Quantization", "", ", ".join(f"{k}: {v}" for k, v in q.items()) + "."]
    lines += _isa_lines(report) + _mixed_lines(report) + _qat_lines(report)
    lines += _variant_lines(report)
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


_SUBS = ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0), (1.0, 2.0, 5.0), (1.0, 3.0), (1.0,))


def _readable_log_ticks(fig: Any, ax: Any) -> None:
    """Log-axis labels that never collide.

    Matplotlib labels the minor ticks of a log axis that spans about a decade
    ("3x10^-2 4x10^-2 ..."), and at this figure's width those labels overlapped.
    Minor labels are off; major ticks are plain numbers at the finest of 1..9, 1-2-5,
    1-3 or powers of ten whose rendered labels (real text extents) do not touch and
    that shows at least two, so a narrow axis still has labels.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    for subs in _SUBS:
        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=50))
        boxes = tick_label_boxes(fig, ax)
        if len(boxes) >= 2 and not overlapping(boxes):
            return
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0,)))


def tick_label_boxes(fig: Any, ax: Any, minor: bool = False) -> list[Any]:
    """Window extents of the x tick labels that are drawn (inside the axis, non-empty)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(ax.get_xlim())
    labels = ax.xaxis.get_minorticklabels() if minor else ax.xaxis.get_majorticklabels()
    return [t.get_window_extent(renderer) for t in labels
            if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]  # fmt: skip


def overlapping(boxes: list[Any], pad_px: float = 2.0) -> bool:
    boxes = sorted(boxes, key=lambda b: b.x0)
    return any(b.x0 < a.x1 + pad_px for a, b in itertools.pairwise(boxes))


def _isa_lines(report: dict[str, Any]) -> list[str]:
    isa = report.get("isa")
    if not isa:
        return []
    host = isa["build_host"]
    return ["", "## Instruction set", "",
            f"Measured on: {host['label']} (its preset: `{host['preset']}`). "
            f"Preset used: `{isa['preset']}` ({isa['preset_reason']}), built for "
            f"{isa['preset_target']}.",
            "Every latency and INT8 accuracy figure here is the build host's; a device "
            "with another instruction set measures its own (bundle variants)."]  # fmt: skip


def _mixed_lines(report: dict[str, Any]) -> list[str]:
    m = report.get("mixed_precision")
    if not m:
        return []
    task = report["task"]
    lines = ["", "## Mixed precision", "",
             f"Static INT8 broke the gate, so each of the {m['quantizable']} quantizable nodes "
             "was quantized alone and its relative error against the float model measured "
             "(calibration rows); the most sensitive were kept float one at a time.", "",
             "| node | op | error alone | kept float |", "|---|---|---|---|"]  # fmt: skip
    kept = set(m["kept_float"])
    for s in m["sensitivity"]:
        lines.append(f"| {s['node']} | {s['op']} | {s['error']:.4g} | "
                     f"{'yes' if s['node'] in kept else ''} |")  # fmt: skip
    lines += ["", "| float nodes | metric | gate |", "|---|---|---|"]
    for step in m["steps"]:
        lines.append(f"| {len(step['kept_float'])} | {_fmt_metric(task, step['metric'])} "
                     f"| {'pass' if step['passed'] else 'fail'} |")  # fmt: skip
    return lines


def _qat_lines(report: dict[str, Any]) -> list[str]:
    qat = report.get("qat")
    if not qat:
        return []
    rows = {r["stage"]: r for r in report["stages"]}
    task = report["task"]
    lines = ["", "## Quantization-aware training", ""]
    ptq = rows.get("onnx int8")
    for stage, info in qat.items():
        lines.append(
            f"{stage}: {info['epochs']} epoch(s) at lr {info['lr']}, {info['activation_quantizers']}"
            f" activation quantizers (ranges from the {info['percentile']}th percentile, then "
            f"learned), {info['weights_folded']} int8 weight tensors; "
            f"{_fmt_metric(task, rows[stage].get('metric'))}"
            + (f" vs post-training {ptq.get('method', 'static')} INT8 "
               f"{_fmt_metric(task, ptq.get('metric'))}" if ptq and ptq is not rows[stage] else "")
            + "."
        )  # fmt: skip
    return lines


def _variant_lines(report: dict[str, Any]) -> list[str]:
    variants = report.get("variants")
    if not variants:
        return []
    lines = ["", "## Bundle variants", "",
             "The device measures each variant its runtimes can load and serves the fastest "
             "that passes its golden replay.", "",
             "| id | stage | precision | method | built for |", "|---|---|---|---|---|"]  # fmt: skip
    for v in variants:
        lines.append(f"| {v['id']} | {v['stage']} | {v['precision']} | {v['method'] or '-'} "
                     f"| {v['built_for'] or '-'} |")  # fmt: skip
    return lines


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path)
    plt.close(fig)
    return path


def figure(report: dict[str, Any]) -> Any:
    """The report's Matplotlib figure (quality vs latency and size)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    rows = [r for r in report["stages"] if r.get("latency_ms") and r.get("metric") is not None]
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110, sharey=True)
    selected = set(report.get("selected", {}).values())
    palette = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        marker = "s" if "int8" in r["stage"] else ("^" if r["format"] == "tflite" else "o")
        label = r["stage"] + (" (selected)" if r["stage"] in selected else "")
        points = ((ax_lat, r["latency_ms"]["p50"]), (ax_size, (r.get("size_bytes") or 1) / 1024))
        for ax, x in points:
            ax.scatter(x, r["metric"], s=110 if r["stage"] in selected else 70,
                       color=palette(i % 10), marker=marker, alpha=0.85, zorder=3,
                       edgecolors="black" if r["stage"] in selected else "none",
                       linewidths=1.5, label=label if ax is ax_lat else None)  # fmt: skip
    if not rows:
        ax_lat.text(0.5, 0.5, "no measured candidates", ha="center", transform=ax_lat.transAxes)
    ax_lat.set_xlabel("latency p50, batch 1 (ms, log)")
    ax_size.set_xlabel("file size (KiB, log)")
    ax_lat.set_ylabel("top-1 accuracy (%)" if report["task"] == "classification"
                      else "mean cosine to teacher")  # fmt: skip
    if rows:
        ax_lat.legend(fontsize=7, loc="best")
    for ax in (ax_lat, ax_size):
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{report['name']} {report['version']}: quality vs latency and size "
                 "(square = INT8, triangle = TFLite float, outlined = selected)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    for ax in (ax_lat, ax_size):
        _readable_log_ticks(fig, ax)
    return fig


def write_reports(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "report.json": directory / "report.json",
        "report.md": directory / "report.md",
        "report.png": directory / "report.png",
    }
    paths["report.json"].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    paths["report.md"].write_text(markdown(report))
    plot(report, paths["report.png"])
    log.info("wrote report.json, report.md and report.png in %s", directory)
    return paths
