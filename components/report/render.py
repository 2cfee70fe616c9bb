"""The comparison report: per dataset and task family, methods x test metrics as means with 95%
intervals over seeds, the probability of improvement, the compute each method got, plots, and one
sentence that claims only what the intervals support.

``reports/index.html`` is self-contained (inline CSS, figures as data URIs: it opens from disk
with no network); each family also gets ``reports/families/<dataset>-<task>.md`` and ``.csv``
with its figures as PNG beside them; ``reports/summary.json`` holds the primary metric of every
run (a DVC metric).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from components.report.collect import Entry
from components.report.stats import Interval, claim, fmt, interval, probability_of_improvement

COMPUTE_FLAG_RATIO = 2.0  # a method given more than 2x (or under 1/2) its family's median compute


@dataclass
class Row:
    entry: Entry
    metrics: dict[str, Interval]  # test metric -> interval over seeds
    p_vs_baseline: float | None  # on the primary metric
    parameters: float | None
    flops_per_image: float | None
    device_seconds: float | None
    wall_s: float | None
    flag: str = ""


@dataclass
class Family:
    dataset: str
    task: str
    primary: str  # test/<metric>
    higher_is_better: bool
    metrics: list[str]
    rows: list[Row]
    baseline: Row | None
    pairwise: dict[tuple[str, str], float] = field(default_factory=dict)  # P(row > column), primary
    sentence: str = ""

    @property
    def slug(self) -> str:
        return f"{self.dataset}-{self.task}"

    @property
    def contenders(self) -> list[Row]:
        return [r for r in self.rows if not r.entry.baseline]


def build_families(entries: list[Entry], task_info) -> list[Family]:
    """``task_info(task)``: (primary metric name, higher_is_better) of a task family."""
    grouped: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        grouped.setdefault((e.dataset, e.task), []).append(e)
    families = []
    for (dataset, task), members in grouped.items():
        primary, higher = task_info(task)
        primary = f"test/{primary}"
        metrics = sorted(
            set.intersection(*({k for s in e.seeds for k in s.metrics if k.startswith("test/")} for e in members))
        )
        metrics = [primary] + [m for m in metrics if m != primary]
        rows = [_row(e, metrics) for e in members]
        baseline = next((r for r in rows if r.entry.baseline), None)
        for r in rows:
            if baseline is not None and r is not baseline:
                r.p_vs_baseline = probability_of_improvement(
                    r.entry.values(primary), baseline.entry.values(primary), higher
                )
        family = Family(dataset, task, primary, higher, metrics, rows, baseline)
        _flag_compute(family)
        for a in family.contenders:
            for b in family.contenders:
                if a is not b:
                    family.pairwise[(a.entry.name, b.entry.name)] = probability_of_improvement(
                        a.entry.values(primary), b.entry.values(primary), higher
                    )
        family.sentence = _sentence(family)
        families.append(family)
    return families


def _row(e: Entry, metrics: list[str]) -> Row:
    train, evaluation = e.median("compute/train_wall_s"), e.median("compute/eval_wall_s")
    return Row(
        entry=e,
        metrics={m: interval(e.values(m)) for m in metrics},
        p_vs_baseline=None,
        parameters=e.median("compute/parameters"),
        flops_per_image=e.median("compute/forward_flops_per_image"),
        device_seconds=e.median("compute/device_seconds"),
        wall_s=(train or 0.0) + (evaluation or 0.0) if train is not None else None,
    )


def _flag_compute(family: Family) -> None:
    """Equal footing made visible: a contender whose device-seconds or epochs differ from the
    family's median by more than ``COMPUTE_FLAG_RATIO``."""
    rows = family.contenders
    for attr, label in (("device_seconds", "device-s"), ("epochs", "epochs")):
        values = [(r, getattr(r, attr) if attr != "epochs" else r.entry.epochs) for r in rows]
        values = [(r, v) for r, v in values if v]
        if len(values) < 2:
            continue
        median = statistics.median(v for _, v in values)
        for r, v in values:
            ratio = v / median
            if ratio > COMPUTE_FLAG_RATIO or ratio < 1 / COMPUTE_FLAG_RATIO:
                note = f"{label} {ratio:.1f}x the family median"
                r.flag = f"{r.flag}; {note}" if r.flag else note


def _sentence(family: Family) -> str:
    """The best contender against the next (or the baseline, if it is alone), on the primary metric."""
    sign = 1 if family.higher_is_better else -1
    ranked = sorted(family.contenders, key=lambda r: -sign * r.metrics[family.primary].mean)
    metric = family.primary
    if len(ranked) >= 2:
        a, b = ranked[0], ranked[1]
    elif ranked and family.baseline is not None:
        a, b = ranked[0], family.baseline
    else:
        return f"no claim: only {len(family.rows)} run(s) in this family"
    said = claim(a.entry.name, a.metrics[metric], b.entry.name, b.metrics[metric], family.higher_is_better)
    return f"{metric}: {said}"


# --- figures ----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def interval_plot(family: Family) -> bytes:
    plt = _plt()
    rows = family.rows
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        iv = r.metrics[family.primary]
        ax.errorbar(
            iv.mean,
            i,
            xerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
            fmt="o",
            capsize=4,
            color="grey" if r.entry.baseline else "C0",
        )
        ax.scatter(r.entry.values(family.primary), [i] * iv.n, s=8, color="k", alpha=0.4, zorder=3)
    ax.set_yticks(range(len(rows)), [f"{r.entry.name} (n={r.metrics[family.primary].n})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{family.primary}: mean, 95% CI over seeds, each seed")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def curves_plot(family: Family) -> bytes:
    """Validation curves: the mean over seeds, with the band from the lowest to the highest seed."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, r in enumerate(family.contenders):
        steps = sorted({s for seed in r.entry.seeds for s, _ in seed.curve})
        if not steps:
            continue
        table = np.array([[dict(seed.curve).get(s, np.nan) for s in steps] for seed in r.entry.seeds], dtype=float)
        mean = np.nanmean(table, axis=0)
        ax.plot(np.array(steps) + 1, mean, label=r.entry.name, color=f"C{i % 10}")
        if table.shape[0] > 1:
            ax.fill_between(
                np.array(steps) + 1, np.nanmin(table, 0), np.nanmax(table, 0), alpha=0.2, color=f"C{i % 10}"
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(family.primary.replace("test/", "val/"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation: mean over seeds, band = min..max seed", fontsize=9)
    return _png(fig)


def compute_plot(family: Family) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, r in enumerate(family.contenders):
        if not r.device_seconds:
            continue
        iv = r.metrics[family.primary]
        ax.errorbar(
            r.device_seconds,
            iv.mean,
            yerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
            fmt="o",
            capsize=3,
            color=f"C{i % 10}",
            label=r.entry.name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("device-seconds per seed (median)")
    ax.set_ylabel(family.primary)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


# --- tables -----------------------------------------------------------------------------------


def _num(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table_rows(family: Family) -> list[dict[str, str]]:
    """One dict per row, the cells as text (the Markdown and HTML tables)."""
    out = []
    for r in family.rows:
        cells = {"run": r.entry.name + (" (baseline)" if r.entry.baseline else ""), "method": r.entry.method}
        cells["n"] = str(r.metrics[family.primary].n)
        for m in family.metrics:
            cells[m] = fmt(r.metrics[m])
        if r.metrics[family.primary].iqm is not None:
            cells[f"IQM {family.primary}"] = f"{r.metrics[family.primary].iqm:.3f}"
        if family.baseline is not None:
            cells["P(> baseline)"] = _num(r.p_vs_baseline, ".2f")
        cells["params"] = _num(r.parameters, ",.0f")
        cells["GFLOPs/img"] = _num(r.flops_per_image / 1e9 if r.flops_per_image else None, ".3f")
        cells["epochs"] = str(r.entry.epochs)
        cells["device-s"] = _num(r.device_seconds, ".1f")
        cells["wall s"] = _num(r.wall_s, ".1f")
        cells["compute"] = r.flag or "-"
        out.append(cells)
    return out


def _columns(rows: list[dict[str, str]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def markdown(family: Family, figures: dict[str, str]) -> str:
    rows = table_rows(family)
    cols = _columns(rows)
    lines = [
        f"# {family.dataset} / {family.task}",
        "",
        f"**{family.sentence}**",
        "",
        "Test metrics: mean over seeds with the 95% percentile-bootstrap interval; P(> baseline): the probability "
        "that a seed of the method beats a seed of the random-init baseline (Mann-Whitney).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(row.get(c, "") for c in cols) + " |" for row in rows]
    if family.pairwise:
        names = [r.entry.name for r in family.contenders]
        lines += [
            "",
            f"P(row > column) on {family.primary}:",
            "",
            "| | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 1),
        ]
        for a in names:
            cells = ["-" if a == b else f"{family.pairwise[(a, b)]:.2f}" for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{title}]({name})" for title, name in figures.items()]
    return "\n".join(lines) + "\n"


def write_csv(family: Family, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "run",
                "method",
                "baseline",
                "metric",
                "mean",
                "ci_low",
                "ci_high",
                "n",
                "iqm",
                "p_vs_baseline",
                "parameters",
                "forward_flops_per_image",
                "epochs",
                "device_seconds",
                "wall_s",
                "compute_flag",
            ]
        )
        for r in family.rows:
            for m in family.metrics:
                iv = r.metrics[m]
                w.writerow(
                    [
                        r.entry.name,
                        r.entry.method,
                        r.entry.baseline,
                        m,
                        iv.mean,
                        iv.low,
                        iv.high,
                        iv.n,
                        "" if iv.iqm is None else iv.iqm,
                        "" if r.p_vs_baseline is None else r.p_vs_baseline,
                        r.parameters,
                        r.flops_per_image,
                        r.entry.epochs,
                        r.device_seconds,
                        r.wall_s,
                        r.flag,
                    ]
                )


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.claim{font-weight:bold}
.flag{color:#a33}img{max-width:48%;margin:4px;border:1px solid #eee}"""


def html_page(families: list[Family], figures: dict[str, dict[str, bytes]], meta: dict[str, str]) -> str:
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Comparison</title><style>{CSS}</style>"
        "</head><body><h1>Comparison of methods</h1>"
    ]
    parts.append(
        "<p>Per dataset and task family: each method's test metrics as the mean over its seeds with the 95% "
        "percentile-bootstrap interval (IQM from 4 seeds on); P(&gt; baseline): the probability that a seed of "
        "the method beats a seed of the random-init baseline (Mann-Whitney U / nm); compute as the ledger "
        "recorded it. A family's sentence claims only what its intervals support.</p>"
    )
    parts.append("<p>" + " · ".join(f"{esc(k)}: <code>{esc(v)}</code>" for k, v in meta.items()) + "</p>")
    for fam in families:
        parts.append(f"<section id='{esc(fam.slug)}'><h2>{esc(fam.dataset)} / {esc(fam.task)}</h2>")
        parts.append(f"<p class='claim' data-family='{esc(fam.slug)}'>{esc(fam.sentence)}</p>")
        rows = table_rows(fam)
        cols = _columns(rows)
        parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
        for r, cells in zip(fam.rows, rows, strict=True):
            tds = []
            for c in cols:
                attrs = ""
                if c in r.metrics:
                    iv = r.metrics[c]
                    attrs = (
                        f" class='num' data-run='{esc(r.entry.name)}' data-metric='{esc(c)}'"
                        f" data-mean='{iv.mean!r}' data-low='{iv.low!r}' data-high='{iv.high!r}' data-n='{iv.n}'"
                    )
                elif c == "compute" and r.flag:
                    attrs = " class='flag'"
                tds.append(f"<td{attrs}>{esc(cells.get(c, ''))}</td>")
            parts.append("<tr>" + "".join(tds) + "</tr>")
        parts.append("</table>")
        if fam.pairwise:
            names = [r.entry.name for r in fam.contenders]
            parts.append(
                f"<p>P(row &gt; column) on {esc(fam.primary)}:</p><table><tr><th></th>"
                + "".join(f"<th>{esc(n)}</th>" for n in names)
                + "</tr>"
            )
            for a in names:
                cells = "".join(
                    "<td>-</td>" if a == b else f"<td class='num'>{fam.pairwise[(a, b)]:.2f}</td>" for b in names
                )
                parts.append(f"<tr><th>{esc(a)}</th>{cells}</tr>")
            parts.append("</table>")
        for title, png in figures[fam.slug].items():
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


FIGURES = {"intervals": interval_plot, "validation curves": curves_plot, "accuracy vs compute": compute_plot}


def write_report(families: list[Family], out: Path, meta: dict[str, str]) -> dict:
    """Everything under ``out`` (``index.html``, ``families/``, ``summary.json``); returns the summary."""
    fam_dir = out / "families"
    fam_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, bytes]] = {}
    for fam in families:
        figures[fam.slug] = {title: draw(fam) for title, draw in FIGURES.items()}
        names = {}
        for title, png in figures[fam.slug].items():
            name = f"{fam.slug}-{title.replace(' ', '_')}.png"
            (fam_dir / name).write_bytes(png)
            names[title] = name
        (fam_dir / f"{fam.slug}.md").write_text(markdown(fam, names))
        write_csv(fam, fam_dir / f"{fam.slug}.csv")
    (out / "index.html").write_text(html_page(families, figures, meta))
    summary = {
        fam.slug: {
            "claim": fam.sentence,
            "metric": fam.primary,
            "runs": {
                r.entry.name: {"mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n}
                for r in fam.rows
                for iv in [r.metrics[fam.primary]]
            },
        }
        for fam in families
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
