"""What `csrv2 reproduce` writes from its scored rows: the averages, a markdown table, the paper's
targets checked, and two plots (score vs k per method and task; dead latents vs k)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from ..atomic import write_file

LABELS = {"dense": "dense", "mrl-truncate": "MRL truncate", "mrl-linear": "MRL linear", "mrl-finetuned": "MRL finetuned",
          "csr": "CSR", "csrv2-linear": "CSRv2-linear", "csrv2-full": "CSRv2 (full)"}
# What each method's row trains on: the line under the table.
LABELS_OR_PAIRS = "the train split's labels, or its (query, document) pairs"
TRAINED_ON = {"dense": "nothing", "mrl-truncate": "nothing", "mrl-linear": LABELS_OR_PAIRS, "csrv2-linear": LABELS_OR_PAIRS,
              "csr": "the train split without labels, or its (query, document) pairs",
              "csrv2-full": LABELS_OR_PAIRS + ", backbone included", "mrl-finetuned": LABELS_OR_PAIRS + ", backbone included"}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


STAT_NAMES = ("active_dims", "dead_latents_pct", "train_dead_pct", "bytes_per_vector")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, protocol, size): the score per task, their average over tasks, and the mean code statistics.

    The dense backbone is one entry whatever its dimension; an average is None unless every task was scored.
    """
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], _protocol(r), None if r["method"] == "dense" else r["size"])].append(r)
    summary = []
    for (method, protocol, size), group in groups.items():
        per_task = {r["task"]: r["score"] for r in group}
        summary.append({
            "method": method,
            "protocol": protocol,
            "queries": group[0].get("queries"),
            "size": size,
            "per_task": per_task,
            "average": _mean(per_task.values()) if len(per_task) == len(tasks) else None,
            **{name: _mean(r.get(name) for r in group) for name in STAT_NAMES},
        })
    return summary


def _protocol(entry: dict) -> str:
    """"same-k" (queries coded like the documents: the paper's protocol, and every dense method's) or "asymmetric"."""
    return entry.get("protocol", "same-k")


def _label(entry: dict) -> str:
    return LABELS[entry["method"]] + (f", asymmetric: {entry['queries']}" if _protocol(entry) == "asymmetric" else "")


def _find(summary: list[dict], method: str, size: int | None, protocol: str = "same-k") -> dict | None:
    return next((s for s in summary if s["method"] == method and s["size"] == size and _protocol(s) == protocol), None)


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """Rows: method and size; columns: each task's headline metric, the average, % of dense, dead latents, bytes per vector;
    then a line saying what each method trains on."""
    rows, summary = results["rows"], results["summary"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    metric = {r["task"]: r["metric"] for r in rows}
    dense = _find(summary, "dense", None)
    head = ["method", "k / dims", *[f"{t} ({metric[t]})" for t in tasks],
            "average", "% of dense", "dead latents (eval %)", "bytes / vector"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summary:
        size = str(int(s["active_dims"])) if s["method"] == "dense" else str(s["size"])
        share = 100 * s["average"] / dense["average"] if dense and dense["average"] and s["average"] is not None else None
        cells = [_label(s), size, *[_fmt(s["per_task"].get(t)) for t in tasks], _fmt(s["average"]),
                 _fmt(share, 1), _fmt(s["dead_latents_pct"], 1), _fmt(s["bytes_per_vector"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [trained_on([s["method"] for s in summary])]
    if any(_protocol(s) == "asymmetric" for s in summary):
        notes.append("Asymmetric: the same stored codes, queries coded with more latents (query k, or the row's k if larger) "
                     "or dense (the head's projection), which changes retrieval and 1-NN; the other rows code queries and "
                     "documents alike, as the paper does.")
    return "\n".join([*lines, "", *notes])


def trained_on(methods: list[str]) -> str:
    """One line saying what each of `methods` trains on, methods that train on the same grouped together."""
    groups: dict[str, list[str]] = defaultdict(list)
    for method in dict.fromkeys(methods):
        groups[TRAINED_ON[method]].append(LABELS[method])
    return "Trained on: " + "; ".join(f"{', '.join(names)}: {what}" for what, names in groups.items()) + "."


def target_lines(results: dict) -> list[str]:
    """The paper's claims for CSRv2 at k = 2 (averages over tasks), checked on this run where it has what they compare:
    CSRv2-linear against CSR k = 8, MRL linear 32 and 85% of dense; CSRv2 (full) against CSRv2-linear and 90% of dense."""
    summary = results["summary"]
    dense = _find(summary, "dense", None)
    checks = {"csrv2-linear": (("CSR at k = 8", _find(summary, "csr", 8), 1.0),
                               ("MRL linear at 32 dims", _find(summary, "mrl-linear", 32), 1.0), ("85% of dense", dense, 0.85)),
              "csrv2-full": (("CSRv2-linear at k = 2", _find(summary, "csrv2-linear", 2), 1.0), ("90% of dense", dense, 0.9))}
    lines = []
    for method, targets in checks.items():
        ours = _find(summary, method, 2)
        if ours is None or ours["average"] is None:
            continue
        for label, other, factor in targets:
            if other is None or other["average"] is None:
                continue
            bar = factor * other["average"]
            verdict = "met" if ours["average"] >= bar else "missed"
            lines.append(f"- {LABELS[method]} k = 2 average {ours['average']:.3f} >= {label} ({bar:.3f}): {verdict}")
    return lines


def plot_results(results: dict, out: str | os.PathLike) -> list[Path]:
    """score_vs_k.png (one panel per task, and the average) and dead_latents_vs_k.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    out = Path(out)
    rows, summary = results["rows"], results["summary"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    panels = [*tasks, "average"]
    cols = min(4, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(panels) / cols)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for color, method in enumerate(LABELS):
            for protocol in ("same-k", "asymmetric"):
                entries = [s for s in summary if s["method"] == method and _protocol(s) == protocol]
                value = (lambda s: s["average"]) if panel == "average" else (lambda s, task=panel: s["per_task"].get(task))
                points = [(s["size"], value(s)) for s in entries if value(s) is not None]
                if method == "dense" and points:
                    ax.axhline(points[0][1], color="black", linestyle="--", label="dense")
                elif points:  # a method keeps its colour; its asymmetric line is dotted
                    ax.plot(*zip(*sorted(points)), marker="o", color=f"C{color}", linestyle=":" if protocol == "asymmetric" else "-",
                            label=_label(entries[0]))
        ax.set_xscale("log", base=2)
        ax.set_title(panel if panel == "average" else f"{panel}", fontsize=10)
        ax.set_xlabel("k (sparse) / dims (MRL)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _legend(axes.flat[0])
    fig.tight_layout()
    paths = [_save(fig, out / "score_vs_k.png")]

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "dead_latents_pct", "latents unused on the evaluation sets (%)"),
                           (axes[1], "train_dead_pct", "dead at the end of training (%)")):
        for method in ("csr", "csrv2-linear", "csrv2-full"):
            entries = [s for s in summary if s["method"] == method and _protocol(s) == "same-k"]  # the same codes in both protocols
            points = sorted((s["size"], s[key]) for s in entries if s[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[method])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(title, fontsize=10)
        _legend(ax)
    fig.tight_layout()
    paths.append(_save(fig, out / "dead_latents_vs_k.png"))
    return paths


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel with no lines gets no (empty) legend
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


__all__ = ["markdown_table", "plot_results", "summarise", "target_lines", "trained_on"]
