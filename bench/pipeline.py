"""Per-stage times of a main job, and the ratio to the run before it, so a slowdown is seen.

Reads `summary.json` of a finished run and, beside it, `summary.previous.json` (the summary that run replaced;
or any other summary given with --against). Stages that an invocation skipped (finished earlier) take their
time from their stage's `_DONE.json` where the summary lists it. Prints the CPU and precision each run reports.

    .venv/bin/python bench/pipeline.py [--run-dir runs/embedded] [--against other/summary.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safetrigger.artifacts import PREVIOUS_SUMMARY  # noqa: E402


def stage_seconds(summary: dict) -> dict[str, float]:
    """The summary's `<name>_s` timings, plus the stage-store times of stages this invocation skipped."""
    times = {k.removesuffix("_s"): float(v) for k, v in (summary.get("timings") or {}).items() if k.endswith("_s")}
    for row in summary.get("stage_times") or []:
        times.setdefault(row["stage"], float(row["seconds"]))
    return times


def cpu_line(summary: dict) -> str:
    p = summary.get("precision") or {}
    c = p.get("cpu") or {}
    if not c:
        return "CPU not recorded (a summary from before precision reporting)"
    return (f"{c.get('model')} ({c.get('logical_cpus')} CPUs, {' '.join(c.get('simd', []))}); serving "
            f"{p.get('serving', {}).get('dtype')}, SFT {p.get('sft', {}).get('dtype')}, DPO {p.get('dpo', {}).get('dtype')}")


def compare(now: dict, before: dict | None) -> str:
    a, b = stage_seconds(now), stage_seconds(before or {})
    rows = ["| stage | this run (s) | previous (s) | this / previous |", "|---|---:|---:|---:|"]
    for stage in sorted(set(a) | set(b), key=lambda s: (s == "total", s)):
        x, y = a.get(stage), b.get(stage)
        ratio = f"{x / y:.2f}" + (" SLOWER" if x / y > 1.2 else "") if x and y else ""
        rows.append(f"| {stage} | {'' if x is None else f'{x:.0f}'} | {'' if y is None else f'{y:.0f}'} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/embedded")
    ap.add_argument("--against", help="another summary.json to compare with (default: the run's previous summary)")
    args = ap.parse_args()
    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run the main job first (make run)")
    now = json.loads(path.read_text())
    other = Path(args.against) if args.against else Path(args.run_dir) / PREVIOUS_SUMMARY
    before = json.loads(other.read_text()) if other.is_file() else None
    print(f"this run:     {cpu_line(now)}")
    print(f"previous run: {cpu_line(before) if before else f'none ({other} not found)'}\n")
    print(compare(now, before))


if __name__ == "__main__":
    main()
