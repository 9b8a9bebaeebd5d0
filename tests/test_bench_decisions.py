"""bench/decisions.py: the gate's verdicts over seeds, tabulated from the summaries the main job writes."""

import sys
from pathlib import Path

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import decisions as bench  # noqa: E402


def _check(suite, metric, base, cand, hi, passed=True):
    return {"suite": suite, "metric": metric, "base": base, "cand": cand, "delta": cand - base,
            "delta_lo": cand - base - 0.1, "delta_hi": hi, "passed": passed}


def _summary(promoted: str | None) -> dict:
    st_d = [_check("harmful", "asr", 1.0, 0.4, -0.3), _check("jailbreak", "asr", 1.0, 0.5, -0.2),
            _check("over_refusal", "over_refusal", 0.03, 0.02, 0.03)]
    st_s = [_check("harmful", "asr", 1.0, 0.3, -0.5), _check("over_refusal", "over_refusal", 0.03, 0.2, 0.3, passed=False)]
    return {"report": {"promoted": {"name": promoted} if promoted else None,
                       "decisions": [{"candidate": "st-d", "promote": promoted is not None, "checks": st_d},
                                     {"candidate": "st-s", "promote": False, "checks": st_s}]},
            "trigger": [{"model": "ST-D", "kind": "harmful", "n": 10, "fired": 6},
                        {"model": "ST-D", "kind": "jailbreak", "n": 10, "fired": 4},
                        {"model": "ST-D", "kind": "general", "n": 50, "fired": 1}]}


def test_rows_name_the_promoted_candidate_its_numbers_and_what_the_rejected_one_failed_on():
    rows = {r["candidate"]: r for r in bench.decision_rows("seed-0", _summary("st-d@v3"))}
    assert rows["st-d"]["verdict"] == "PROMOTED" and rows["st-s"]["verdict"] == "rejected"
    assert rows["st-d"]["harmful ASR"] == "40.0% (-60.0 pp, CI hi -30.0)"
    assert rows["st-d"]["trigger unsafe / safe"] == "50.0% / 2.0%"
    assert rows["st-s"]["failed on"] == "over_refusal" and rows["st-s"]["jailbreak ASR"] == "–"
    assert rows["st-s"]["trigger unsafe / safe"] == "–"  # no trigger rows for that model in this summary


def test_promotion_share_counts_runs_that_promoted_and_the_table_has_a_row_per_candidate():
    runs = {"seed-0": _summary("st-d@v1"), "seed-1": _summary(None)}
    assert bench.promotion_share(runs) == "promoted on 1 of 2 run(s) (seed-0)"
    table = bench.markdown([r for n, s in runs.items() for r in bench.decision_rows(n, s)])
    assert len(table.splitlines()) == 2 + 4 and "| seed-1 | st-d | rejected |" in table


def test_each_seed_sets_every_sampling_and_training_seed_and_its_own_output_folder():
    assert bench.seed_overrides(3, Path("runs/seeds")) == [
        "generation.seed=3", "sft.seed=3", "dpo.seed=3", "output_dir=runs/seeds/seed-3"]
