"""The base model's texts the think model learns from, kept in data/think_targets.json: used only where made from
the build's inputs, and what the build then trains on without generating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safetrigger import think_model, think_targets
from safetrigger.method import REVIEW_PART_CUES
from safetrigger.think_model import ThinkBuild


def test_the_committed_targets_were_made_from_this_build_s_inputs():
    """Fails when a prompt file, the review layout, a generation setting or the base model changed and the file
    was not written again (`python -m safetrigger.think_targets`)."""
    spec = ThinkBuild()
    targets = think_targets.committed_targets(spec)
    assert targets is not None, "data/think_targets.json was made from other inputs: write it again"
    requests = think_model.read_prompts(think_model.PROMPTS)[:spec.self_prompts]
    assert len(targets.answers) >= spec.self_prompts // 2
    assert all(request in requests and reasoning and answer for request, reasoning, answer in targets.answers)
    harmful = think_model.read_prompts(think_model.REVIEW_PROMPTS)[:spec.review_prompts]
    assert 6 <= len(targets.reviews) <= spec.review_prompts
    for rows in targets.reviews:
        assert len(rows) == len(REVIEW_PART_CUES) + 1 and sum(q in rows[0][0] for q in harmful) == 1
        parts = [completion.strip() for _, completion in rows[:-1]]
        # each row's prompt is the one before it with its completion added: the build's one-part-per-row layout
        assert all(rows[k + 1][0].startswith(rows[k][0]) and parts[k] in rows[k + 1][0][len(rows[k][0]):]
                   for k in range(len(parts)))
        assert think_model.well_formed(parts, rows[-1][1])  # what the SFT data stage keeps, as it is today


@pytest.mark.parametrize("change", ["a generation setting", "a prompt file", "the file's id"])
def test_targets_made_from_other_inputs_are_not_used(change, tmp_path, monkeypatch):
    spec = ThinkBuild()
    path = tmp_path / "think_targets.json"
    path.write_text(think_targets.TARGETS.read_text())
    assert think_targets.committed_targets(spec, path) is not None
    if change == "a generation setting":
        spec = ThinkBuild(part_max_tokens=spec.part_max_tokens + 1)
    elif change == "a prompt file":
        prompts = tmp_path / "think_prompts.jsonl"
        prompts.write_text(think_model.PROMPTS.read_text() + json.dumps({"prompt": "One more request."}) + "\n")
        monkeypatch.setattr(think_model, "PROMPTS", prompts)
    else:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "targets_id": "0" * 16}))
    assert think_targets.committed_targets(spec, path) is None


def test_a_damaged_targets_file_names_itself_and_what_is_wrong(tmp_path):
    path = tmp_path / "think_targets.json"
    record = json.loads(think_targets.TARGETS.read_text())
    record["reviews"][1][2] = ["a prompt without its completion"]
    path.write_text(json.dumps(record))
    with pytest.raises(think_targets.ThinkTargetsError, match=rf"{path}.*reviews\[1\]\[2\] is not a list of 2 strings"):
        think_targets.committed_targets(ThinkBuild(), path)
    path.write_text("{not json")
    with pytest.raises(think_targets.ThinkTargetsError, match=str(path)):
        think_targets.committed_targets(ThinkBuild(), path)


class _Reached(Exception):
    pass


def _stop_at(name: str):
    def stop(*args, **kwargs):
        raise _Reached(name)
    return stop


@pytest.mark.parametrize("committed", [True, False])
def test_the_build_generates_only_where_the_file_does_not_serve(committed, model_path, data_root, tmp_path,
                                                               monkeypatch):
    """With the committed texts the build goes straight to training on them; without, the base model writes them
    and the build says why."""
    lines = []
    if not committed:
        monkeypatch.setattr(think_model, "committed_targets", lambda spec: None)
    monkeypatch.setattr(think_model, "own_targets", _stop_at("generation"))
    trained_on = []

    def train(model, tok, examples, spec, scratch, dtype):
        trained_on.extend(examples)
        raise _Reached("training")

    monkeypatch.setattr(think_model, "train_merged", train)
    with pytest.raises(_Reached) as reached:
        think_model.build_think_model(Path(model_path), tmp_path / "out", data_root, emit=lines.append)
    if not committed:
        assert str(reached.value) == "generation" and "is missing or was made from other inputs" in lines[0]
        return
    targets = think_targets.committed_targets(ThinkBuild())
    review_rows = [row for rows in targets.reviews for row in rows]
    assert str(reached.value) == "training" and "texts committed" in lines[-1]
    assert trained_on[-len(review_rows):] == review_rows
    assert [think_model.think_row(*e) for e in targets.answers] == trained_on[ThinkBuild().gsm8k:-len(review_rows)]
