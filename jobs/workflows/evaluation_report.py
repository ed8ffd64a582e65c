"""`report.html`: the evaluation as plots, one self-contained file (inline SVG, no scripts, no
network), readable in any browser:

1. target perplexity per method: every seed as a dot, the mean as a bar, the base model and random
   as reference lines;
2. where each selection came from (share of each source, next to the pool);
3. the distribution of each method's selection scores;
4. the numbers, as a table.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.stages.report import composition, pool_counts, selection_counts

# 20 source colours, every pair at least 32 apart in CIE76 delta E (about 2.3 is a just-noticeable
# difference): Tableau's first four, then farthest-point picks in CIELAB over sRGB colours of
# lightness 35-80 and chroma 25-70 (readable on white, none neon). Beyond 20 sources they repeat.
COLOURS = ["#4e7aa6", "#f49037", "#de5959", "#599b4e", "#ff90ff", "#00d3d3", "#4e43b1", "#6f4e21",
           "#a6006f", "#d3c837", "#f4b1c8", "#debc85", "#006459", "#854e64", "#0090ff", "#00de9b",
           "#c8b1ff", "#21c8ff", "#7a7a00", "#ff6fa6"]  # fmt: skip
SHOWN_TEXTS = 5  # selected texts shown per method
SHOWN_CHARS = 160
W = 760  # chart width in px


def luminance(colour: str) -> float:
    """WCAG relative luminance of an sRGB hex colour."""
    rgb = [int(colour[k : k + 2], 16) / 255 for k in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _ink(colour: str) -> str:
    """Text colour on a bar of `colour`: white or near-black, whichever contrasts more (WCAG)."""
    lum = luminance(colour)
    on_white = 1.05 / (lum + 0.05)
    on_dark = (lum + 0.05) / (luminance("#222222") + 0.05)
    return "#fff" if on_white >= on_dark else "#222"


def _text(x, y, s, size=12, anchor="start", weight="normal", fill="#222") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}" fill="{fill}">{html.escape(str(s))}</text>'
    )


def _svg(height: int, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
        f'viewBox="0 0 {W} {height}" font-family="Helvetica, Arial, sans-serif">'
        + "".join(body)
        + "</svg>"
    )


def perplexity_chart(result: dict) -> str:
    summary = result["summary"]
    methods = sorted(summary, key=lambda m: summary[m]["perplexity_mean"])
    base = result["base"]["perplexity"]
    values = [r["perplexity"] for r in result["runs"]] + [base]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = max(0.0, lo - pad), hi + pad
    left, right, row, top = 120, W - 30, 34, 30
    height = top + row * len(methods) + 50

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (right - left)

    body = [_text(left, 16, "lower is better · dots: seeds · bar: mean", 11, fill="#666")]
    for i, m in enumerate(methods):
        y = top + i * row + row / 2
        s = summary[m]
        colour = "#999" if m == "random" else ("#59a14f" if m == "oracle" else "#4e79a7")
        body.append(_text(left - 10, y + 4, m, 13, "end", "bold"))
        body.append(
            f'<line x1="{left}" x2="{right}" y1="{y}" y2="{y}" stroke="#eee" stroke-width="1"/>'
        )
        body.append(
            f'<line x1="{x(s["perplexity_min"]):.1f}" x2="{x(s["perplexity_max"]):.1f}" '
            f'y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/>'
        )
        for r in result["runs"]:
            if r["method"] == m:
                body.append(
                    f'<circle cx="{x(r["perplexity"]):.1f}" cy="{y}" r="4" fill="{colour}"/>'
                )
        mx = x(s["perplexity_mean"])
        body.append(
            f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{y - 10}" y2="{y + 10}" stroke="{colour}" '
            'stroke-width="3"/>'
        )
        spread = f" ± {s['perplexity_std']:.2f}" if s["seeds"] > 1 else ""
        body.append(
            _text(x(s["perplexity_mean"]) + 8, y - 8, f"{s['perplexity_mean']:.2f}{spread}", 11)
        )
    bottom = top + row * len(methods)
    lines = [("no fine-tune", base, "#e15759")]
    if "random" in summary:
        lines.append(("random", summary["random"]["perplexity_mean"], "#666"))
    for k, (name, v, colour) in enumerate(lines):
        body.append(
            f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top - 4}" y2="{bottom}" stroke="{colour}" '
            'stroke-dasharray="5,4" stroke-width="1.5"/>'
        )
        body.append(_text(x(v), bottom + 16 + 13 * k, f"{name} {v:.2f}", 11, "middle", fill=colour))
    for v in np.linspace(lo, hi, 6):
        body.append(_text(x(v), bottom + 44, f"{v:.1f}", 10, "middle", fill="#666"))
    body.append(
        _text((left + right) / 2, bottom + 60, "perplexity on the held-out target texts", 11,
              "middle", fill="#444")
    )  # fmt: skip
    return _svg(height + 16, body)


def run_folder(run_dir: Path, method: str, seed: int) -> Path:
    """Where `raysift evaluate` keeps one method's run for one seed."""
    return run_dir / RunFolder.evaluate_run(method, seed)


def pool_colours(in_pool: dict | None) -> dict[str, str]:
    """A colour per value, in the order of its count in the pool (largest first): the source
    bars' and the selected texts' tags."""
    counts = in_pool or {}
    order = sorted(counts, key=lambda v: (-counts[v], str(v)))
    return {str(v): COLOURS[i % len(COLOURS)] for i, v in enumerate(order)}


def composition_chart(
    result: dict, run_dir: Path, in_pool: dict | None, column: str = "source"
) -> str | None:
    """Stacked bars: share of each `column` value in the pool (`in_pool`: its counts) and in each
    method's selection."""
    if in_pool is None:
        return None
    bars: list[tuple[str, Counter]] = []
    for m in result["summary"]:
        selection = run_folder(run_dir, m, result["seeds"][0]) / RunFolder.SELECTION
        if selection.is_file():
            rows = composition(in_pool, selection_counts(selection, column))
            if not bars:
                bars.append(("pool", Counter({v: n for v, n, _ in rows})))
            bars.append((m, Counter({v: k for v, _, k in rows if k})))
    if not bars:
        return None
    colour = pool_colours(in_pool)
    values = list(colour)  # largest in the pool first
    left, right, row, top = 120, W - 30, 30, 10
    body = []
    for i, (name, counts) in enumerate(bars):
        y = top + i * row
        body.append(_text(left - 10, y + 15, name, 13, "end", "bold"))
        total, at = sum(counts.values()), float(left)
        for v in values:
            w = counts.get(v, 0) / total * (right - left)
            if w > 0:
                body.append(
                    f'<rect x="{at:.1f}" y="{y}" width="{w:.1f}" height="20" fill="{colour[v]}">'
                    f"<title>{html.escape(str(v))}: {counts[v]} ({100 * counts[v] / total:.1f}%)"
                    "</title></rect>"
                )
                if w > 34:
                    body.append(
                        _text(
                            at + w / 2,
                            y + 14,
                            f"{100 * counts[v] / total:.0f}%",
                            10,
                            "middle",
                            fill=_ink(colour[v]),
                        )
                    )
            at += w
    y = top + len(bars) * row + 10
    for i, v in enumerate(values):
        cx = left + (i % 4) * 150
        cy = y + (i // 4) * 18
        body.append(f'<rect x="{cx}" y="{cy}" width="12" height="12" fill="{colour[v]}"/>')
        body.append(_text(cx + 17, cy + 10, v, 11))
    return _svg(y + 18 * ((len(values) + 3) // 4) + 6, body)


def first_selected(path: Path, k: int = SHOWN_TEXTS) -> list[dict]:
    """The first k rows of a selected.jsonl (rank order), read line by line: never the file."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) == k:
                break
            rows.append(json.loads(line))
    return rows


def _shorten(text: str, n: int = SHOWN_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def chosen_texts(result: dict, run_dir: Path, colour: dict, column: str = "source") -> str:
    """Per method (first seed): its first selected texts, shortened, tagged with their source in
    the colour the source bars use (`colour`)."""
    blocks = []
    for m in result["summary"]:
        path = run_folder(run_dir, m, result["seeds"][0]) / RunFolder.SELECTED
        if not path.is_file():
            continue
        items = []
        for row in first_selected(path):
            value = row.get(column)
            tag = ""
            if value is not None:
                c = colour.get(str(value), "#999")
                tag = (f'<span class="tag" style="background:{c};color:{_ink(c)}">'
                       f"{html.escape(str(value))}</span> ")  # fmt: skip
            items.append(f"<li>{tag}{html.escape(_shorten(row.get('text', '')))}</li>")
        blocks.append(f"<h3>{html.escape(m)}</h3><ol class='texts'>{''.join(items)}</ol>")
    return "".join(blocks)


def score_charts(result: dict, run_dir: Path) -> str:
    """One small histogram of selection scores per method (first seed)."""
    seed = result["seeds"][0]
    panels = []
    for m in result["summary"]:
        path = run_folder(run_dir, m, seed) / RunFolder.SELECTION
        if not path.is_file():
            continue
        scores = np.asarray(pq.read_table(path, columns=["score"])["score"].to_pylist(), float)
        scores = scores[np.isfinite(scores)]
        if len(scores) == 0:
            continue
        counts, edges = np.histogram(scores, bins=30)
        w, h, left, top = 350, 150, 10, 24
        info = result["summary"][m]
        on = f" on {info['representation']}" if info.get("representation") else ""
        body = [_text(left, 14, f"{m}: {info.get('score') or 'score'}{on}", 12, weight="bold")]
        peak = counts.max() or 1
        bw = (w - 2 * left) / len(counts)
        for i, c in enumerate(counts):
            bh = c / peak * (h - top - 24)
            body.append(
                f'<rect x="{left + i * bw:.1f}" y="{h - 20 - bh:.1f}" width="{bw - 1:.1f}" '
                f'height="{bh:.1f}" fill="#4e79a7"/>'
            )
        body.append(_text(left, h - 5, f"{edges[0]:.3g}", 10, fill="#666"))
        body.append(_text(w - left, h - 5, f"{edges[-1]:.3g}", 10, "end", fill="#666"))
        panels.append(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'font-family="Helvetica, Arial, sans-serif">{"".join(body)}</svg>'
        )
    return "".join(f'<div class="panel">{p}</div>' for p in panels)


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def summary_table(result: dict) -> str:
    task = result["base"].get("task_metric")
    head = ("method", "on", "seeds", "perplexity", "± std", "vs random", "vs no fine-tune",
            *([task["metric"]] if task else []), "share from target", "label TV",
            "selection s")  # fmt: skip
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    base = result["base"]
    rows.append(
        f"<tr><td>no fine-tune</td><td>–</td><td>–</td><td>{base['perplexity']:.2f}</td>"
        + "<td>–</td>" * 3 + (f"<td>{task['value']:.3f}</td>" if task else "")
        + "<td>–</td>" * 3
        + "</tr>"
    )
    summary = result["summary"]
    for m in sorted(summary, key=lambda k: summary[k]["perplexity_mean"]):
        s = summary[m]
        std = s["perplexity_std"] if s["seeds"] > 1 else None  # one seed has no spread
        cells = (m, s.get("representation") or "–", s["seeds"], _fmt(s["perplexity_mean"], ".2f"),
                 _fmt(std, ".2f"), _fmt(s["vs_random"], "+.2f"), _fmt(s["vs_base"], "+.2f"),
                 *([_task_cell(s)] if task else []),
                 _fmt(s["share_from_target"]), _fmt(s["label_tv"]),
                 _fmt(s.get("selection_seconds_mean"), ".1f"))  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _task_cell(s: dict) -> str:
    if s.get("task_metric_mean") is None:
        return "–"
    sd = f" ± {s['task_metric_std']:.3f}" if s.get("task_metric_std") is not None else ""
    return f"{s['task_metric_mean']:.3f}{sd}"


def paired_table(result: dict, key: str = "paired", fmt: str = "+.2f") -> str:
    """Row method minus column method, in perplexity on the same held-out texts, with its 95%
    paired-bootstrap interval; bold where the interval excludes 0."""
    paired, summary = result.get(key) or {}, result["summary"]
    methods = sorted(paired, key=lambda k: summary[k]["perplexity_mean"])
    rows = ["<tr><th>row − column</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods)
            + "</tr>"]  # fmt: skip
    for a in methods:
        cells = []
        for b in methods:
            if a == b:
                cells.append("<td>–</td>")
                continue
            v = paired[a][b]
            text = f"{v['diff']:{fmt}} [{v['low']:{fmt}}, {v['high']:{fmt}}]"
            clear = v["high"] < 0 or v["low"] > 0
            cells.append(f"<td>{'<b>' + text + '</b>' if clear else text}</td>")
        rows.append(f"<tr><td>{html.escape(a)}</td>{''.join(cells)}</tr>")
    return "<table class='paired'>" + "".join(rows) + "</table>"


STYLE = """
body { font-family: Helvetica, Arial, sans-serif; max-width: 800px; margin: 24px auto;
       color: #222; line-height: 1.4; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; }
.panel { display: inline-block; margin: 4px; border: 1px solid #eee; }
h3 { font-size: 14px; margin: 14px 0 4px; }
ol.texts { font-size: 12px; margin: 0; padding-left: 22px; color: #333; }
ol.texts li { margin: 2px 0; }
.tag { font-size: 10px; padding: 1px 5px; border-radius: 3px; white-space: nowrap; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
table.paired { font-size: 11px; }
.verdict { font-size: 15px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
"""


def render(result: dict, run_dir: Path) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    in_pool = pool_counts(run_dir, "source")  # per-part tasks, once for every method
    composition = composition_chart(result, run_dir, in_pool)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>raysift evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>What each selection buys on the target</h1>",
        f"<p class='meta'>budget {result['budget']} rows · model {html.escape(result['model'])} "
        f"({result['finetune']}) · seeds {seeds} · {result['heldout']['texts']} held-out target "
        f"texts, {result['heldout']['tokens']:,} tokens</p>",
        "<h2>Target perplexity after fine-tuning</h2>",
        perplexity_chart(result),
    ]
    if result.get("verdict"):
        parts.append(f"<p class='verdict'><b>{html.escape(result['verdict'])}</b></p>")
    if composition:
        parts += [
            "<h2>Where each selection came from</h2>",
            f"<p class='meta'>share of each source, seed {result['seeds'][0]} (hover: counts)</p>",
            composition,
        ]
    texts = chosen_texts(result, run_dir, pool_colours(in_pool))
    if texts:
        parts += [
            "<h2>What each method chose</h2>",
            f"<p class='meta'>the first {SHOWN_TEXTS} selected texts of each method, best first, "
            f"seed {result['seeds'][0]}, shortened to {SHOWN_CHARS} characters</p>",
            texts,
        ]
    parts += [
        "<h2>Selection scores</h2>",
        f"<div>{score_charts(result, run_dir)}</div>",
        "<h2>Numbers</h2>",
        summary_table(result),
        *(["<h2>Paired differences on the same held-out texts</h2>",
            "<p class='meta'>row method's perplexity minus the column method's, with the 95% "
            "bootstrap interval over the held-out texts (NLL averaged over seeds); bold: the "
            "interval excludes 0. It measures what the choice of texts explains, not the "
            "fine-tune's seed-to-seed spread (± std above).</p>",
            paired_table(result)] if result.get("paired") else []),
        *([f"<h2>Paired differences of the task metric "
           f"({html.escape(result['base']['task_metric']['metric'])})</h2>",
           "<p class='meta'>row method's score minus the column method's on the same held-out "
           "items, 95% bootstrap interval over items; bold: it excludes 0.</p>",
           paired_table(result, "paired_task_metric", "+.3f")]
          if result.get("paired_task_metric") else []),
        "<p class='meta'>Perplexity: exp of the mean token NLL over the held-out texts. Share "
        "from target: selected rows matching <code>evaluate.target_rows</code>. Label TV: "
        "total-variation distance between the selection's and the targets' label histograms. "
        "Every number is in <code>evaluation.json</code>.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)
