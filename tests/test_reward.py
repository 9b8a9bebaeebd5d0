import itertools

import pytest

from safetrigger.method.reward import RewardWeights, Scored, category, reward, select_pair


def s(safe, tagged, t_full=True, s_full=True, text="x"):
    return Scored(text, safe, tagged, t_full, s_full)


def test_order_a_b_c_d_for_every_completeness():
    for t_full, s_full in itertools.product([True, False], repeat=2):
        a, b, c, d = (reward(s(*fe, t_full, s_full)) for fe in [(True, True), (True, False), (False, True), (False, False)])
        assert a > b > c > d == 0.0


def test_complete_reasoning_and_block_score_higher_within_a():
    assert reward(s(True, True, True, True)) > reward(s(True, True, True, False)) > reward(s(True, True, False, False))


def test_formula_values():
    w = RewardWeights(1.0, 0.5, 0.2)
    assert reward(s(True, True), w) == pytest.approx(3.0)
    assert reward(s(True, False), w) == pytest.approx(0.5)
    assert reward(s(False, True), w) == pytest.approx(0.2)
    # S_full only counts when a block exists
    assert reward(s(True, False, s_full=True), w) == reward(s(True, False, s_full=False), w)


def test_categories():
    assert [category(x) for x in (s(True, True), s(True, False), s(False, True), s(False, False))] == list("ABCD")


def test_pair_best_vs_worst_and_delta_filter():
    samples = [s(False, False, text="d"), s(True, True, text="a"), s(True, False, text="b")]
    p = select_pair(samples, delta=1.0)
    assert p.chosen.text == "a" and p.rejected.text == "d" and p.margin == pytest.approx(3.0)
    assert select_pair([s(True, False), s(True, False)], delta=0.1) is None
    assert select_pair([s(True, False), s(False, True)], delta=0.5) is None  # 0.3 apart
    assert select_pair([s(True, True)], delta=0.0) is None


def test_weights_must_be_ordered():
    with pytest.raises(ValueError):
        RewardWeights(0.5, 1.0, 0.2)
