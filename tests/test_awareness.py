import math

import pytest

from pipelines.awareness import awareness_table, format_table, wilson

from .row_factories import judgement, trajectory


def test_wilson_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def j(kind, flagged, refused, split="eval", resolved=True, lp=(-0.7, -1.2)):
    return judgement(kind=kind, verdict_unsafe=flagged, answer_refused=refused, split=split, resolved=resolved,
                     logprob_unsafe=lp[0], logprob_safe=lp[1])


def test_table_counts():
    js = [j("harmful", True, False), j("harmful", True, True), j("harmful", False, False),
          j("general", True, False, resolved=False), j("general", False, False), j("jailbreak", False, True, split="train")]
    rows = awareness_table(js)
    assert [r.kind for r in rows] == ["harmful", "jailbreak", "general"]
    h = rows[0]
    assert (h.n, h.flagged, h.complied, h.flagged_and_complied) == (3, 2, 2, 1)
    assert rows[2].unresolved == 1
    assert h.mass == pytest.approx(math.exp(-0.7) + math.exp(-1.2))  # judge health: the options' probability
    assert [r.kind for r in awareness_table(js, split="eval")] == ["harmful", "general"]
    text = format_table(rows, "m")
    assert "| harmful | 3 |  66.7%" in text and "| 50%, 0.80 |" in text


def test_trigger_rows_count_fired_and_complete_blocks():
    from pipelines.trigger import format_trigger_table, trigger_rows

    ts = [trajectory(kind="general", response="Paris."),
          trajectory(kind="harmful", response="think\n\n<safe>unsafe request</safe>\n\nNo."),
          trajectory(kind="harmful", response="<safe>cut off"),
          trajectory(kind="harmful", response="Sure, step 1.")]
    rows = trigger_rows("ST-S", ts)
    assert [(r.kind, r.n, r.fired, r.complete) for r in rows] == [("harmful", 3, 2, 1), ("general", 1, 0, 0)]
    assert "| ST-S | harmful | 3 |  66.7%" in format_trigger_table(rows)
