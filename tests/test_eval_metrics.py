"""Metric and interval maths against known values; suites over hand-made records."""

import math

import pytest

from safetrigger.evaluation.metrics import Rate, final_number, numbers_match, paired_bootstrap, trigger_stats, wilson
from safetrigger.evaluation.suites import Suite, category_breakdown, compare, suite_metrics, trigger_by_model


@pytest.mark.parametrize("k,n,lo,hi", [
    (5, 10, 0.2366, 0.7634),   # textbook Wilson 95% values
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 20, 0.0089, 0.2361),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_known_values(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=5e-4) and b == pytest.approx(hi, abs=5e-4)


def test_wilson_edges_and_errors():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)
    r = Rate(3, 4)
    assert r.value == 0.75 and "75.0%" in r.fmt() and "(3/4)" in r.fmt()
    assert math.isnan(Rate(0, 0).value) and Rate(0, 0).fmt() == "n/a (n=0)"


def test_paired_bootstrap_degenerate_and_known():
    same = {str(i): i % 2 == 0 for i in range(40)}
    d = paired_bootstrap(same, same, samples=500)
    assert (d.value, d.lo, d.hi, d.n) == (0.0, 0.0, 0.0, 40)
    flipped = paired_bootstrap({str(i): True for i in range(30)}, {str(i): False for i in range(30)}, samples=500)
    assert (flipped.value, flipped.lo, flipped.hi) == (-1.0, -1.0, -1.0)
    # 20 of 100 examples go from unsafe to safe, nothing else changes: delta -0.2, bootstrap sd = sqrt(.2*.8/100) = .04
    base = {str(i): i < 50 for i in range(100)}
    cand = {str(i): i < 30 for i in range(100)}
    d = paired_bootstrap(base, cand, samples=4000, seed=1)
    assert d.value == pytest.approx(-0.2)
    assert d.lo == pytest.approx(-0.2 - 1.96 * 0.04, abs=0.02) and d.hi == pytest.approx(-0.2 + 1.96 * 0.04, abs=0.02)
    only_shared = paired_bootstrap({"a": True, "b": True}, {"b": False, "c": False}, samples=200)
    assert only_shared.n == 1 and only_shared.value == -1.0
    assert paired_bootstrap({}, {"a": True}).n == 0


@pytest.mark.parametrize("text,number", [
    ("So the answer is 180.", "180"),
    ("It costs $1,250 in total", "1250"),
    ("First 3, then 4.5 and finally -2", "-2"),
    ("no numbers here", None),
    ("#### 72", "72"),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_numbers_match():
    assert numbers_match("180", "180") and numbers_match("180.0", "180") and numbers_match("1250", "1,250")
    assert not numbers_match(None, "3") and not numbers_match("4", "3") and not numbers_match("4", "")


def test_trigger_stats():
    pairs = [(True, True)] * 9 + [(True, False)] + [(False, True)] + [(False, False)] * 89
    s = trigger_stats(pairs)
    assert (s.tp, s.fn, s.fp, s.tn) == (9, 1, 1, 89)
    assert s.recall.value == 0.9 and s.false_alarm.value == pytest.approx(1 / 90) and s.precision.value == 0.9


def _rec(model, qid, kind, label, source="advbench", unsafe=None, refused=False, triggered=False, reference="",
         correct=False, category="", xstest_class=""):
    r = {"model": model, "query_id": qid, "kind": kind, "label": label, "source": source, "category": category,
         "refused": refused, "unsafe:refusal": not refused, "triggered": triggered, "reference": reference,
         "correct": correct, "xstest_class": xstest_class}
    if unsafe is not None:
        r["unsafe:self"] = unsafe
    return r


def test_suites_comparisons_and_categories():
    suites = [Suite("harmful", "asr", kinds=("harmful",)), Suite("over_refusal", "over_refusal", sources=("xstest",), labels=("safe",)),
              Suite("general", "accuracy", sources=("gsm8k",))]
    recs = []
    for model, refused_upto, correct in (("base", 1, True), ("ST-D", 3, False)):
        for i in range(4):  # harmful: base refuses 1 of 4, ST-D 3 of 4
            recs.append(_rec(model, f"h{i}", "harmful", "unsafe", refused=i < refused_upto, unsafe=i >= refused_upto,
                             triggered=model == "ST-D", category="weapons" if i < 2 else "fraud"))
        recs.append(_rec(model, "x0", "general", "safe", source="xstest", refused=model == "ST-D", xstest_class="2_full_refusal" if model == "ST-D" else "1_full_compliance"))
        recs.append(_rec(model, "g0", "general", "safe", source="gsm8k", reference="7", correct=correct))
        recs.append(_rec(model, "g1", "general", "safe", source="gsm8k"))  # no reference: not in the accuracy suite
    ms = suite_metrics(recs, suites, ["refusal", "self"], has_xstest=True)
    by = {(m.model, m.suite, m.judge): m.rate for m in ms}
    assert by[("base", "harmful", "refusal")] == Rate(3, 4) and by[("ST-D", "harmful", "refusal")] == Rate(1, 4)
    assert by[("base", "harmful", "self")] == Rate(3, 4)
    assert by[("ST-D", "over_refusal", "refusal")] == Rate(1, 1) and by[("ST-D", "over_refusal", "xstest")] == Rate(1, 1)
    assert by[("base", "general", "exact_match")] == Rate(1, 1) and by[("ST-D", "general", "exact_match")] == Rate(0, 1)
    cmp = {(c.suite, c.judge): c for c in compare(ms, "base", "ST-D", samples=300)}
    assert cmp[("harmful", "refusal")].delta.value == pytest.approx(-0.5)
    assert cmp[("general", "exact_match")].delta.value == -1.0
    cats = {(c.model, c.category): c.rate for c in category_breakdown(recs, suites, "refusal")}
    assert cats[("base", "weapons")] == Rate(1, 2) and cats[("ST-D", "fraud")] == Rate(1, 2)
    trig = trigger_by_model(recs)
    assert trig["ST-D"].recall.value == 1.0 and trig["ST-D"].false_alarm.value == 0.0 and trig["base"].recall.value == 0.0


def test_incomplete_share_pooled_over_the_named_attack_suites_counts_each_prompt_once():
    from safetrigger.evaluation.suites import ATTACK_SUITES, INCOMPLETE

    suites = [Suite("harmful", "asr", kinds=("harmful",)), Suite("jailbreak", "asr", kinds=("jailbreak",)),
              Suite("both", "asr", kinds=("harmful", "jailbreak"))]
    recs = [{**_rec("ST-D", f"h{i}", "harmful", "unsafe"), INCOMPLETE: i == 0} for i in range(3)]
    recs += [{**_rec("ST-D", f"j{i}", "jailbreak", "unsafe"), INCOMPLETE: i < 2} for i in range(5)]
    pooled = {m.suite: m.rate for m in suite_metrics(recs, suites, ["refusal"], pooled_incomplete=("harmful", "jailbreak", "both"))
              if m.metric == INCOMPLETE}
    assert pooled["jailbreak"] == Rate(2, 5) and pooled[ATTACK_SUITES] == Rate(3, 8)  # "both" adds no prompt twice
    assert not any(m.suite == ATTACK_SUITES for m in suite_metrics(recs, suites, ["refusal"]))
