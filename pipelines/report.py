"""The evaluation report: Markdown and one self-contained HTML page (plots inlined), plus the per-example
records (Parquet and JSONL) and metrics.json, so every number can be traced to its examples.

Sections are built once as data (title, text, table, plot) and rendered twice, so the two pages never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetrigger.artifacts import REPORT_HTML, REPORT_MARKDOWN, REPORT_METRICS, REPORT_RECORDS, REPORT_RECORDS_JSONL
from safetrigger.evaluation.metrics import Rate
from safetrigger.evaluation.suites import safe_after_think, trigger_by_model

from .evaluate import EvalResult

MODEL_COLOURS = ("#7f7f7f", "#1f77b4", "#2ca02c", "#d62728")


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    plot: str | None = None  # file name under plots/


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f} pp"


def _rate_cell(r: Rate | None) -> str:
    return "–" if r is None else r.fmt()


def _plot_bars(path: Path, title: str, groups: list[str], models: list[str], rates: dict[tuple[str, str], Rate], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2), dpi=110)
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for g_i, g in enumerate(groups):
            r = rates.get((m, g))
            if r is None or not r.n:
                continue
            a, b = r.interval
            xs.append(g_i + (i - (len(models) - 1) / 2) * width)
            ys.append(100 * r.value)
            lo.append(max(0.0, 100 * (r.value - a)))  # the interval's float ends can sit a hair inside the rate
            hi.append(max(0.0, 100 * (b - r.value)))
        bars = ax.bar(xs, ys, width, label=m, color=MODEL_COLOURS[i % len(MODEL_COLOURS)], yerr=[lo, hi], capsize=3)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=9, frameon=False, ncols=len(models))
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


METRIC_SECTIONS = (("asr", "Attack success rate (lower is safer; answers that never reached one are left out and "
                           "counted as `incomplete`)", "ASR %", "asr.png"),
                   ("over_refusal", "Over-refusal on safe-looking prompts (lower is better)", "refused %", "over_refusal.png"),
                   ("accuracy", "General capability (GSM8K final-number accuracy)", "accuracy %", "accuracy.png"))


def build_sections(result: EvalResult, models: list[str], cfg, throughput: list[dict[str, Any]], plots: Path,
                   awareness_md: str = "", precision: dict[str, Any] | None = None,
                   training: dict[str, dict[str, str]] | None = None) -> list[Section]:
    sections = [_gate_section(result, cfg.eval.gate.judge, precision), _round_section(result, models, cfg, training or {})]
    for metric, title, ylabel, plot in METRIC_SECTIONS:
        chosen = [s for s in cfg.eval.suites if s.metric == metric]
        if chosen:
            sections.append(_metric_section(result, models, cfg, chosen, title, ylabel, plots, plot))
    sections.append(_trigger_section(result, models, plots))
    if result.health:
        sections.append(_health_section(result, cfg.eval.gate))
    if result.categories:
        sections.append(_category_section(result, models, cfg.eval.gate.judge))
    if throughput:
        tp = Section("Stage throughput through the Serve replicas", header=["stage", "rows", "seconds", "examples/s"])
        for t in throughput:
            rate = t["rows"] / t["seconds"] if t["seconds"] else float("nan")
            tp.rows.append([t["stage"], str(t["rows"]), f"{t['seconds']:.1f}", f"{rate:.2f}"])
        sections.append(tp)
    if awareness_md:
        sections.append(Section("Latent safety awareness and training data", text=[awareness_md]))
    return sections


def _gate_section(result: EvalResult, gate_judge: str, precision: dict[str, Any] | None = None) -> Section:
    verdict = Section("Promotion gate")
    if result.promoted:
        verdict.text.append(f"**Promoted: `{result.promoted['model']}`** (gate judge `{gate_judge}`).")
    else:
        verdict.text.append("**Nothing promoted**: the base (or an earlier promotion) keeps serving.")
    if precision:
        verdict.text.append(reproducibility_note(precision, result))
    verdict.header = ["candidate", "suite", "metric", "judge", "base", "candidate", "change [95% CI]", "n",
                      "answers to flip", "result"]
    for d in result.decisions:
        for c in d.checks:
            verdict.rows.append([d.candidate, c.suite, c.metric, c.judge,
                                 "–" if math.isnan(c.base) else f"{100 * c.base:.1f}%",
                                 "–" if math.isnan(c.cand) else f"{100 * c.cand:.1f}%",
                                 f"{_pp(c.delta)} [{_pp(c.delta_lo)}, {_pp(c.delta_hi)}]", str(c.n),
                                 "–" if c.flips is None else str(c.flips), "pass" if c.passed else "FAIL"])
        verdict.text.append(f"- `{d.candidate}`: {'passes' if d.promote else 'rejected'}" +
                            ("" if d.promote else ": " + "; ".join(d.reasons)))
    return verdict


def _round_section(result: EvalResult, models: list[str], cfg, training: dict[str, dict[str, str]]) -> Section:
    from .rounds import round_table

    header, rows = round_table(result, models, cfg, training)
    sec = Section("Per round", header=header, rows=rows)
    sec.text.append("One row per trained model (SFT, then each DPO round) beside the base. Acceptance: ST-S, the "
                    "tagged targets kept of the unsafe training queries reviewed (the rest failed the method's rules "
                    "or the selection); ST-D, the queries that gave a preference pair. Rates by the gate's judges on "
                    "the eval split; the held-out suites are not gated.")
    return sec


def reproducibility_note(precision: dict[str, Any], result: EvalResult) -> str:
    """What the decision was computed in, and why the same seed and config may decide otherwise on another CPU."""
    cpu, serving = precision["cpu"], precision["serving"]
    closest = min((c.flips for d in result.decisions for c in d.checks if c.flips is not None), default=None)
    near = (f" The closest tolerance criterion above turns on {closest} answer(s) (column `answers to flip`)."
            if closest is not None else "")
    return (f"Decided on {cpu['model']} ({' '.join(cpu['simd']) or 'no AVX'}), serving in {serving['dtype']} "
            f"({serving['reason']}), SFT in {precision['sft']['dtype']}, DPO in {precision['dpo']['dtype']}. "
            "The same seed and config sample other text in another float format: under `dtype: auto` a CPU with "
            "AVX512-BF16 or AMX computes in bfloat16 and an AVX2-only CPU in float32, so their answers, and a decision "
            "that turns on a few of them, can differ." + near + " To compare machines, set `model.dtype: float32`, "
            "`sft.precision: fp32` and `dpo.precision: fp32` on both. Nor is a decision fixed on one machine: a CPU "
            "engine's sums depend on which requests share a batch, and that depends on when they arrive, so two runs "
            "of one config can train different adapters (two clean runs of the embedded config on one CPU: one "
            "promoted ST-D, the other trained a trigger that over-refused and was refused). Judge a config by "
            "several runs, not by one decision.")


def _metric_section(result: EvalResult, models: list[str], cfg, suites, title: str, ylabel: str, plots: Path,
                    plot: str) -> Section:
    """One table row and one plot group per (suite, judge), the gate's judge first; changes vs base per candidate."""
    e = cfg.eval
    by = {(m.model, m.suite, m.judge): m for m in result.metrics}
    cands = models[1:]
    sec = Section(title, header=["suite", "judge", *models, *[f"{c} − base [95% CI]" for c in cands]])
    groups, rates = [], {}
    for s in suites:
        judges = sorted({m.judge for m in result.metrics if m.suite == s.name}, key=lambda j: (j != e.gate.judge, j))
        for j in judges:
            row = [s.name + (" (held-out)" if s.held_out else ""), j] + [_rate_cell(by[(m, s.name, j)].rate if (m, s.name, j) in by else None) for m in models]
            for c in cands:
                cmp = next((x for x in result.comparisons.get(c, []) if x.suite == s.name and x.judge == j), None)
                row.append("–" if cmp is None else f"{_pp(cmp.delta.value)} [{_pp(cmp.delta.lo)}, {_pp(cmp.delta.hi)}]")
            sec.rows.append(row)
            g = f"{s.name}\n({j})"
            groups.append(g)
            rates.update({(m, g): by[(m, s.name, j)].rate for m in models if (m, s.name, j) in by})
    chosen = {s.name for s in suites}
    averaged = False
    for c in cands:
        for a in result.averages.get(c, []):
            if set(a.suites) <= chosen:
                averaged = True
                means = {models[0]: a.base, c: a.cand}
                sec.rows.append([f"average over {a.group} ({len(a.suites)})", a.judge,
                                 *(f"{100 * means[m]:.1f}%" if m in means else "" for m in models),
                                 *(f"{_pp(a.delta.value)} [{_pp(a.delta.lo)}, {_pp(a.delta.hi)}]" if x == c else ""
                                   for x in cands)])
    sec.text.append("Rates with 95% Wilson intervals and counts; changes are paired (same prompts) with a "
                    f"percentile bootstrap ({e.bootstrap_samples} resamples)." + (
                        " An average row is the mean over its benchmarks (suites), each weighed alike, as the paper "
                        "reports; its interval resamples each benchmark on its own." if averaged else "") + (
                        " A held-out suite's prompts come from a source no split trained on (prompts and attacks "
                        "the pipeline never saw); it is averaged apart from the in-distribution suites."
                        if any(s.held_out for s in suites) else ""))
    _plot_bars(plots / plot, title, groups, models, rates, ylabel)
    sec.plot = plot
    return sec


def _trigger_section(result: EvalResult, models: list[str], plots: Path) -> Section:
    trig = Section("`<safe>` trigger behaviour (unsafe prompts vs general prompts)",
                   header=["model", "fires on unsafe (recall)", "fires on safe (false alarm)", "precision",
                           "`<safe>` after `</think>`"])
    stats = trigger_by_model(result.records)
    after = safe_after_think(result.records)
    rates = {}
    for m in [m for m in models if m in stats]:
        s = stats[m]
        position = after[m].fmt() if after.get(m) and after[m].n else "no think block"
        trig.rows.append([m, s.recall.fmt(), s.false_alarm.fmt(), s.precision.fmt(), position])
        rates[(m, "unsafe prompts")] = s.recall
        rates[(m, "safe prompts")] = s.false_alarm
    trig.text.append("Paper: ~90–99% on unsafe vs <0.1% on general prompts. Positive class: unsafe label. The last "
                     "column: of the tagged responses of a model that reasons in a think block, those whose block "
                     "opens after the reasoning, as the method places it.")
    _plot_bars(plots / "trigger.png", "<safe> trigger rate", ["unsafe prompts", "safe prompts"], models, rates, "fired %")
    trig.plot = "trigger.png"
    return trig


def _health_section(result: EvalResult, gate) -> Section:
    sec = Section("Judge health (log-prob judges)", header=["judge", "kind", "n", "options in top-k", "option mass", "status"])
    for h in result.health:
        ok = h.healthy(gate.min_judge_resolved, gate.min_judge_mass)
        sec.rows.append([h.judge, h.kind, str(h.n), f"{100 * h.resolved:.1f}%", f"{h.mass:.2f}",
                         "ok" if ok else "BELOW FLOOR"])
    sec.text.append(f"A verdict reads two option tokens at one position: both must be in the top-k and hold real "
                    f"probability, else it is noise. Floors: {100 * gate.min_judge_resolved:.0f}% of rows resolved, "
                    f"mean mass ≥ {gate.min_judge_mass:.2f}; the gate does not decide on a model judge below them.")
    return sec


def _category_section(result: EvalResult, models: list[str], gate_judge: str) -> Section:
    cat = Section(f"ASR per category (judge `{gate_judge}`)", header=["suite", "category", *models])
    cells = {(c.model, c.suite, c.category): c.rate for c in result.categories}
    for suite, category in dict.fromkeys((c.suite, c.category) for c in result.categories):
        cat.rows.append([suite, category, *[_rate_cell(cells.get((m, suite, category))) for m in models]])
    return cat


def _md(sections: list[Section], title: str, intro: list[str]) -> str:
    out = [f"# {title}", "", *intro, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        out += [*s.text, ""] if s.text else []
        if s.header:
            out.append("| " + " | ".join(s.header) + " |")
            out.append("|" + "---|" * len(s.header))
            out += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in s.rows]
            out.append("")
        if s.plot:
            out += [f"![{s.title}](plots/{s.plot})", ""]
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """The little Markdown the texts use: `code` and **bold**."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _html(sections: list[Section], title: str, intro: list[str], plots: Path) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}"
           "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
           "th{background:#f3f3f3}td.fail{color:#b00;font-weight:600}td.pass{color:#070}"
           "img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}pre{white-space:pre-wrap}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", *[f"<p>{_inline_md(p)}</p>" for p in intro]]
    for s in sections:
        out.append(f"<h2>{_inline_md(s.title)}</h2>")
        for p in s.text:
            if "\n|" in p or p.startswith("|") or "\n" in p.strip():
                out.append(f"<pre>{html.escape(p)}</pre>")
            else:
                out.append(f"<p>{_inline_md(p)}</p>")
        if s.header:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr>")
            for row in s.rows:
                cells = []
                for c in row:
                    cls = " class='fail'" if c == "FAIL" else " class='pass'" if c == "pass" else ""
                    cells.append(f"<td{cls}>{html.escape(c).replace(chr(10), '<br>')}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        if s.plot:
            data = base64.b64encode((plots / s.plot).read_bytes()).decode()
            out.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def _finite(x: Any) -> Any:
    """Strict JSON: a rate of nothing (n=0) is null, not NaN, so every JSON reader accepts the file."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out_dir: Path, result: EvalResult, models: list[str], cfg, throughput: list[dict[str, Any]],
                 awareness_md: str = "", precision: dict[str, Any] | None = None,
                 training: dict[str, dict[str, str]] | None = None) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    sections = build_sections(result, models, cfg, throughput, plots, awareness_md, precision, training)
    title = f"Safe Trigger evaluation: {cfg.name} ({cfg.model.source})"
    n_eval = len({r["query_id"] for r in result.records})
    intro = [f"{n_eval} eval-split prompts (disjoint from SFT and DPO data), models: {', '.join(models)}. "
             "Judges read the final answer only (no reasoning, no `<safe>` analysis). Per-example records: "
             "`records.parquet` / `records.jsonl`; all numbers: `metrics.json`."]
    paths = {"markdown": out_dir / REPORT_MARKDOWN, "html": out_dir / REPORT_HTML, "records": out_dir / REPORT_RECORDS,
             "records_jsonl": out_dir / REPORT_RECORDS_JSONL, "metrics": out_dir / REPORT_METRICS}
    _write_atomic(paths["markdown"], _md(sections, title, intro))
    _write_atomic(paths["html"], _html(sections, title, intro, plots))
    tmp = out_dir / ".records.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(result.records), tmp)
    os.replace(tmp, paths["records"])
    _write_atomic(paths["records_jsonl"], "".join(json.dumps(r, default=str) + "\n" for r in result.records))
    metrics = {
        "models": models,
        "adapters": result.adapters,
        "suites": [{"model": m.model, "suite": m.suite, "metric": m.metric, "judge": m.judge, "k": m.rate.k, "n": m.rate.n,
                    "rate": m.rate.value, "ci95": m.rate.interval} for m in result.metrics],
        "comparisons": {c: [{"suite": x.suite, "metric": x.metric, "judge": x.judge, "base": x.base.value,
                             "candidate": x.cand.value, "delta": asdict(x.delta)} for x in cs]
                        for c, cs in result.comparisons.items()},
        "trigger": {m: {"recall": s.recall.value, "false_alarm": s.false_alarm.value, "precision": s.precision.value,
                        "safe_after_think": asdict(safe_after_think(result.records)[m]), **asdict(s)}
                    for m, s in trigger_by_model(result.records).items()},
        "averages": {c: [asdict(a) for a in avs] for c, avs in result.averages.items()},
        "judge_health": [asdict(h) for h in result.health],
        "decisions": [d.to_dict() for d in result.decisions],
        "promoted": result.promoted,
        "throughput": throughput,
    }
    _write_atomic(paths["metrics"], json.dumps(_finite(metrics), indent=2, default=str, allow_nan=False))
    return paths
