"""`safe-trigger runs` and `safe-trigger compare A B`: the tracking store's main-job runs, side by side."""

from __future__ import annotations

from typing import Any

HEADLINE = ("harmful/asr/refusal", "jailbreak/asr/refusal", "over_refusal/over_refusal/refusal")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def main_runs(uri: str, experiment: str) -> list[Any]:
    """Main-job runs (not their stages), newest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def runs_table(uri: str, experiment: str) -> str:
    lines = ["| run | id | status | model | " + " | ".join(f"{m} {h.split('/')[0]}" for h in HEADLINE for m in ("base", "ST-D")) + " |",
             "|---|---|---|---|" + "---:|" * (2 * len(HEADLINE))]
    for r in main_runs(uri, experiment):
        cells = [_pct(r.data.metrics.get(f"{m}/{h}")) for h in HEADLINE for m in ("base", "ST-D")]
        lines.append(f"| {r.info.run_name} | {r.info.run_id[:8]} | {r.info.status} | {r.data.tags.get('safe_trigger.model', '')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def find_run(uri: str, experiment: str, ref: str):
    """A main-job run by id (or its first characters) or by name (the newest of that name)."""
    for r in main_runs(uri, experiment):
        if r.info.run_id.startswith(ref) or r.info.run_name == ref:
            return r
    raise LookupError(f"no run {ref!r} in experiment {experiment!r} of {uri}")


def compare_table(uri: str, experiment: str, a_ref: str, b_ref: str) -> str:
    """Every metric both runs have, with its 95% interval where recorded, and B - A."""
    a, b = find_run(uri, experiment, a_ref), find_run(uri, experiment, b_ref)
    ma, mb = a.data.metrics, b.data.metrics
    names = sorted(k for k in ma.keys() & mb.keys() if not k.endswith(("/ci_lo", "/ci_hi")))
    lines = [f"A: {a.info.run_name} ({a.info.run_id[:8]})  B: {b.info.run_name} ({b.info.run_id[:8]})", "",
             "| metric | A [95% CI] | B [95% CI] | B − A |", "|---|---|---|---:|"]
    for k in names:
        lines.append(f"| {k} | {_with_ci(ma, k)} | {_with_ci(mb, k)} | {mb[k] - ma[k]:+.4f} |")
    return "\n".join(lines)


def _with_ci(m: dict[str, float], k: str) -> str:
    lo, hi = m.get(f"{k}/ci_lo"), m.get(f"{k}/ci_hi")
    return f"{m[k]:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "")
