"""The main job's stages, declared (see `pipelines/graph.py`): self-generate, self-judge, self-review (with its
candidates' judges when answers are self-selected), SFT data,
ST-S, its eval answers, DPO sampling, F_safe, pairs, ST-D, its eval answers, and one judge stage per
(evaluated model, model judge). `ARCHITECTURE.md` draws this list.

Key recipes are kept exactly as the stores on disk were keyed (a test pins them), so runs resume across versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetrigger.config import AnswerJudgeConfig, RunConfig

from .graph import Job, Keys, Skip, Stage

QUERIES = "queries"  # the graph's root: every query with its split (its key hashes the ids and splits)
Results = dict[str, Any]
# (display name, adapter, the stage holding its answers on the eval split); the base's stage holds every split
EVALUATED = (("base", "", "generate"), ("ST-S", "st-s", "eval-st-s"), ("ST-D", "st-d", "eval-st-d"))


def _generate(job: Job, r: Results, store) -> list[dict[str, Any]]:
    from .generate import run_generate

    return run_generate(r[QUERIES], job.policy(), job.cfg, store)


def _judge(job: Job, r: Results, store) -> list[dict[str, Any]]:
    from .judge import run_judge

    return run_judge(r["generate"], job.policy(), job.cfg, store)


def _review(job: Job, r: Results, store) -> list[dict[str, Any]]:
    from .review import run_review

    return run_review(r["generate"], job.policy(), job.cfg, store)


def _review_judge(job: Job, r: Results, store) -> list[dict[str, Any]]:
    from .answer_judge import run_review_judge

    return run_review_judge(r["review"], r["generate"], job.policy(), job.cfg, store)


def _sft_data(job: Job, r: Results, path: Path) -> dict[str, Any]:
    from .sft_data import build_sft_examples, format_selection_table, write_jsonl

    examples, stats = build_sft_examples(r["generate"], r["review"], job.cfg, job.model_path, r.get("review-judge"))
    write_jsonl(path, examples)
    job.emit(f"[sft-data] {len(examples)} examples -> {path}; kept {stats['kept']}, dropped {stats['dropped']}")
    if "selection" in stats:
        job.emit("\n" + format_selection_table(stats) + "\n")
    return {"path": str(path), "examples": len(examples), "stats": stats}


def _train_st_s(job: Job, r: Results, adapter_dir: Path) -> dict[str, Any] | Skip:
    from .runtime import init_ray
    from .train.sft import train_sft

    if not job.cfg.sft.enabled:
        return Skip("sft.enabled is false")
    data = r["sft-data"]
    init_ray(job.cfg)
    job.emit(f"[st-s] SFT on {data['examples']} examples, {job.cfg.sft.num_workers} Ray Train worker(s)")
    return train_sft(data["path"], job.model_path, adapter_dir, job.cfg, name=adapter_dir.name.replace("-adapter", ""),
                     emit=job.emit, on_step=_steps(job, "sft-adapter"))


def _eval_answers(adapter: str):
    def run(job: Job, r: Results, store) -> list[dict[str, Any]]:
        from .generate import run_generate

        return run_generate([q for q in r[QUERIES] if q.split == "eval"], job.policy(), job.cfg, store, adapter=adapter)

    return run


def _dpo_sample(job: Job, r: Results, store) -> list[dict[str, Any]] | Skip:
    from .sample import run_sample

    pool = [q for q in r[QUERIES] if q.split == "dpo"]
    if not job.cfg.dpo.enabled:
        return Skip("dpo.enabled is false")
    if not pool:
        return Skip(f"no queries of kinds {job.cfg.data.dpo_kinds} in the dpo split: ST-D not trained")
    return run_sample(pool, job.policy(), job.cfg, store, adapter="st-s")


def _dpo_judge(job: Job, r: Results, store) -> list[dict[str, Any]]:
    from .answer_judge import run_answer_judge

    return run_answer_judge(r["dpo-sample"], job.policy(), job.cfg, store)


def _dpo_pairs(job: Job, r: Results, path: Path) -> dict[str, Any]:
    from .dpo_data import build_dpo_pairs, format_pair_table
    from .sft_data import write_jsonl

    pairs, stats = build_dpo_pairs(r["dpo-sample"], r["dpo-judge"], job.cfg, job.model_path)
    write_jsonl(path, pairs)
    job.emit(f"[dpo-pairs] {len(pairs)} pairs -> {path}\n\n{format_pair_table(stats)}\n")
    return {"path": str(path), "pairs": len(pairs), "stats": stats}


def _train_st_d(job: Job, r: Results, adapter_dir: Path) -> dict[str, Any] | Skip:
    from .runtime import init_ray
    from .train.dpo import train_dpo

    pairs = r["dpo-pairs"]
    if not pairs["pairs"]:
        return Skip("no pair passed delta and max_length: ST-D not trained")
    init_ray(job.cfg)
    job.emit(f"[st-d] DPO on {pairs['pairs']} pairs, {job.cfg.dpo.num_workers} Ray Train worker(s)")
    return train_dpo(pairs["path"], job.model_path, r["sft-adapter"]["dir"], adapter_dir, job.cfg,
                     name=adapter_dir.name.replace("-adapter", ""), emit=job.emit, on_step=_steps(job, "dpo-adapter"))


def _steps(job: Job, stage: str):
    """Each training step's logged numbers (rank 0) into the stage's tracking run."""
    return None if job.tracker is None else job.tracker.step_logger(stage)


def _weights(c: RunConfig) -> tuple[str, ...]:
    """A built model's recipe joins the root key (every model-dependent stage descends from `generate`), so a
    rebuilt model under the same name is not served results of the old one. Empty for other models, whose keys
    stay as they were."""
    from safetrigger.model_cache import model_revision

    revision = model_revision(c.model.source)
    return (revision,) if revision else ()


def _selection_stages(cfg: RunConfig | None) -> tuple[list[Stage], tuple[str, ...]]:
    """The review-judge stage and the input it adds to sft-data, only when `review.select_judges` is set (so the
    keys of runs without selection stay as they were)."""
    if cfg is None or not cfg.review.select_judges:
        return [], ()
    stage = Stage("review-judge", ("review", "generate"), lambda c, k: (
        "review-judge", k["review"], [j.key_fields() for j in c.review.select_judges],
        *(() if c.review.when_none_safe == "drop" else (c.review.when_none_safe,))), _review_judge,
        doc="every review candidate's answer judged (self-selected answers)")
    return [stage], ("review-judge",)


def pipeline_stages(cfg: RunConfig | None = None) -> list[Stage]:
    """Self-generation to ST-D's eval answers. Each key recipe: the stage's config slice and its inputs' keys."""
    d = lambda c: c.dpo  # noqa: E731
    selection, selected = _selection_stages(cfg)
    return [
        Stage("generate", (QUERIES,), lambda c, k: (
            "generate", c.model.model_dump(),
            c.generation.model_dump(exclude=set(c.generation.OPERATIONAL)), k[QUERIES],
            *_weights(c)),
            _generate, doc="the policy answers every query: think1, answer1"),
        Stage("judge", ("generate",), lambda c, k: ("judge", k["generate"], c.judge.model_dump()), _judge,
              doc="the policy judges its own reasoning (awareness)"),
        Stage("review", ("generate",), lambda c, k: ("review", k["generate"], c.review.key_slice(),
                                                     c.judge.max_reasoning_tokens), _review,
              doc="unsafe training queries: <safe> block + answer2"),
        *selection,
        Stage("sft-data", ("generate", "review", *selected), lambda c, k: (
            k["review"], c.sft_data.model_dump(), *(k[s] for s in selected)), _sft_data,
              output="jsonl", doc="SFT targets (method.sft)"),
        Stage("sft-adapter", ("review", "sft-data", *selected), lambda c, k: (
            "sft", k["review"], c.sft_data.model_dump(), c.sft.key_fields(), *(k[s] for s in selected)), _train_st_s, output="adapter",
              publish="st-s", doc="ST-S: SFT on Ray Train, served as policy:st-s"),
        Stage("eval-st-s", ("sft-adapter", "generate"), lambda c, k: ("eval-st-s", k["sft-adapter"], k["generate"]),
              _eval_answers("st-s"), doc="ST-S answers the eval split"),
        Stage("dpo-sample", ("sft-adapter", QUERIES), lambda c, k: (
            "dpo-sample", k["sft-adapter"], k[QUERIES], d(c).num_samples, d(c).temperature, d(c).top_p,
            d(c).max_tokens, d(c).seed), _dpo_sample, doc="ST-S samples k answers per held-apart query"),
        Stage("dpo-judge", ("dpo-sample",), lambda c, k: ("dpo-judge", k["dpo-sample"], d(c).judge.key_fields()),
              _dpo_judge, doc="F_safe of every sample"),
        Stage("dpo-pairs", ("dpo-sample", "dpo-judge"), lambda c, k: (
            "dpo-pairs", k["dpo-judge"], d(c).w_a, d(c).w_b, d(c).w_c, d(c).delta, d(c).max_length,
            *(() if d(c).rejected == "worst" else (d(c).rejected,))), _dpo_pairs,
              output="jsonl", doc="chosen/rejected by the method's reward"),
        Stage("dpo-adapter", ("dpo-pairs", "sft-adapter"), lambda c, k: (
            "dpo", k["dpo-pairs"], {f: v for f, v in d(c).key_fields().items() if f not in ("judge", "enabled", "rejected")}),
              _train_st_d, output="adapter",
              publish="st-d", doc="ST-D: DPO on Ray Train from ST-S, served as policy:st-d"),
        Stage("eval-st-d", ("dpo-adapter", "generate"), lambda c, k: ("eval-st-d", k["dpo-adapter"], k["generate"]),
              _eval_answers("st-d"), doc="ST-D answers the eval split"),
    ]


def judge_stage_name(judge: AnswerJudgeConfig, adapter: str) -> str:
    return f"eval-judge-{judge.name}-{adapter or 'base'}"


def _judge_run(model: str, adapter: str, answers: str, judge: AnswerJudgeConfig, xstest: bool):
    def run(job: Job, r: Results, store) -> list[dict[str, Any]] | Skip:
        from .answer_judge import judge_answers
        from .evaluate import model_records, over_refusal_selected

        if not job.cfg.eval.enabled:
            return Skip("eval.enabled is false")
        rows = model_records(model, adapter, r[answers], {q.id: q for q in r[QUERIES]}, job.cfg, job.model_path)
        if xstest:
            rows = over_refusal_selected(rows, job.cfg)
        items = [(x["query_id"], x["prompt"], x["answer"]) for x in rows]
        return judge_answers(items, job.policy(), judge, job.cfg, store, judge_stage_name(judge, adapter))

    return run


def eval_judge_stages(cfg: RunConfig) -> list[Stage]:
    """One stage per evaluated model and model judge (refusal match needs no stage); judges read the final answer
    only, always with the base weights, so base and candidates are judged alike."""
    stages = []
    for model, adapter, answers in EVALUATED:
        for j in [j for j in cfg.eval.judges if j.type != "refusal"]:
            stages.append(Stage(judge_stage_name(j, adapter), (answers, QUERIES), lambda c, k, a=answers, j=j: (
                "eval-judge", k[a], j.key_fields(), c.model.max_model_len), _judge_run(model, adapter, answers, j, False),
                doc=f"judge {j.name} on {model}'s answers"))
        if cfg.eval.xstest_judge is not None:
            j = cfg.eval.xstest_judge
            stages.append(Stage(judge_stage_name(j, adapter), (answers, QUERIES), lambda c, k, a=answers, j=j: (
                "eval-xstest", k[a], j.key_fields(), c.model.max_model_len), _judge_run(model, adapter, answers, j, True),
                doc=f"XSTest classes of {model}'s over-refusal answers"))
    return stages


def main_graph(cfg: RunConfig) -> list[Stage]:
    return pipeline_stages(cfg) + eval_judge_stages(cfg)
