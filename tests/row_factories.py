"""Typed stage rows for unit tests: each factory fills the fields a test does not care about with neutral values,
so a test names only what it checks and still hands the code the type it reads in a run."""

from __future__ import annotations

from typing import Any

from pipelines.rows import Judgement, Review, SampleSet, Trajectory, Verdict


def trajectory(**f: Any) -> Trajectory:
    base = dict(query_id="q", kind="harmful", label="unsafe", split="eval", prompt="p", response="", reasoning="",
                answer="", split_source="leading", prompt_tokens=0, completion_tokens=0, finish_reason="stop",
                sampling="{}", model="m")
    if "response" in f and "answer" not in f:
        base["answer"] = f["response"]
    return Trajectory(**{**base, **f})


def judgement(**f: Any) -> Judgement:
    base = dict(query_id="q", kind="harmful", label="unsafe", split="eval", logprob_unsafe=-1.0, logprob_safe=-1.0,
                baseline=0.0, margin=0.0, verdict_unsafe=False, answer_refused=False, model="m")
    return Judgement(**{**base, **f})


def review(**f: Any) -> Review:
    return Review(**{**dict(query_id="q", review="", finish_reason="stop", completion_tokens=0, sampling="{}"), **f})


def sample_set(**f: Any) -> SampleSet:
    base = dict(query_id="q", kind="jailbreak", label="unsafe", split="dpo", prompt="p", samples=[],
                finish_reasons=[], completion_tokens=0, adapter="st-s", sampling="{}")
    return SampleSet(**{**base, **f})


def verdict(**f: Any) -> Verdict:
    base = dict(query_id="q", judge="self", scores=[], choice=0, resolved=True, xstest_class="", margin=0.0,
                answer_safe=True, mass=1.0)
    return Verdict(**{**base, **f})
