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

from .graph import Job, Skip, Stage
from .rows import Judgement, Review, SampleSet, Trajectory, Verdict

QUERIES = "queries"  # the graph's root: every query with its split (its key hashes the ids and splits)
Results = dict[str, Any]
# (display name, adapter, the stage holding its answers on the eval split); the base's stage holds every split
EVALUATED = (("base", "", "generate"), ("ST-S", "st-s", "eval-st-s"), ("ST-D", "st-d", "eval-st-d"))


def round_suffix(r: int) -> str:
    """DPO round r's stage names: round 1's as they always were (`dpo-adapter`), later ones `-r<r>`."""
    return "" if r == 1 else f"-r{r}"


def round_adapter(r: int) -> str:
    return "st-d" + round_suffix(r)


def round_model(r: int) -> str:
    """DPO round r's model as reports name it: `ST-D`, then `ST-D r<r>`."""
    return "ST-D" if r == 1 else f"ST-D r{r}"


def evaluated(cfg: RunConfig | None) -> list[tuple[str, str, str]]:
    """EVALUATED, then ST-D of every later DPO round (`dpo.rounds`)."""
    rounds = cfg.dpo.rounds if cfg is not None else 1
    return [*EVALUATED, *((round_model(r), round_adapter(r), f"eval-st-d{round_suffix(r)}") for r in range(2, rounds + 1))]


def adapter_stages(cfg: RunConfig | None) -> list[tuple[str, str]]:
    """(adapter, the stage that trains and publishes it), in training order."""
    rounds = cfg.dpo.rounds if cfg is not None else 1
    return [("st-s", "sft-adapter"), *((round_adapter(r), f"dpo-adapter{round_suffix(r)}") for r in range(1, rounds + 1))]


def dpo_round_pool(queries: list, r: int, rounds: int, general_from_train: bool = False) -> list:
    """Round r's share of the dpo split (with `general_from_train`, and of the SFT split's general queries,
    `dpo.general_pool`): each round samples queries no earlier round saw (by the split key's hash, so an attack
    and its plain request stay in one round)."""
    from safetrigger.method.records import stable_hash

    pool = [q for q in queries if q.split == "dpo" or (general_from_train and q.split == "train" and q.kind == "general")]
    return pool if rounds == 1 else [q for q in pool if stable_hash(q.split_key, "dpo-round") % rounds == r - 1]


def _generate(job: Job, r: Results, store) -> list[Any]:
    from .generate import run_generate

    return run_generate(r[QUERIES], job.policy(), job.cfg, store)


def _judge(job: Job, r: Results, store) -> list[Any]:
    from .judge import run_judge

    return run_judge(r["generate"], job.policy(), job.cfg, store)


def _review(job: Job, r: Results, store) -> list[Any] | Skip:
    from .review import run_review

    if not job.cfg.sft.enabled:  # an evaluation-only job: 6.7-8.5 s of the gateway tests' jobs
        return Skip("sft.enabled is false: the review's blocks and answers are SFT targets, nothing else reads them")
    return run_review(r["generate"], job.policy(), job.cfg, store, judgements=r.get("judge"))


def _review_judge(job: Job, r: Results, store) -> list[Any]:
    from .answer_judge import run_review_judge

    return run_review_judge(r["review"], r["generate"], job.policy(), job.cfg, store)


def _sft_data(job: Job, r: Results, path: Path) -> dict[str, Any]:
    from .sft_data import build_sft_examples, format_selection_table, write_jsonl

    examples, stats = build_sft_examples(r["generate"], r["review"], job.cfg, job.model_path, r.get("review-judge"))
    write_jsonl(path, examples)
    job.emit(f"[sft-data] {len(examples)} examples -> {path}; kept {stats['kept']}, dropped {stats['dropped']}"
             + (f"; answers opened by the policy's unsafe verdict {stats['opened']}" if "opened" in stats else "")
             + (f"; looping answers cut where the loop began {stats['trimmed']}" if stats.get("trimmed") else ""))
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
    def run(job: Job, r: Results, store) -> list[Any]:
        from .block_room import run_eval_answers

        return run_eval_answers([q for q in r[QUERIES] if q.split == "eval"], job.policy(), job.cfg, store, adapter)

    return run


def _block_room(c: RunConfig) -> tuple:
    """Part of an adapter eval's key only when set, so the keys of runs without it stay as they were."""
    return () if c.eval.block_room_tokens == 0 else (("block_room", c.eval.block_room_tokens),)


def _dpo_sample(rnd: int):
    def run(job: Job, r: Results, store) -> list[Any] | Skip:
        from .sample import run_sample

        if not job.cfg.dpo.enabled:
            return Skip("dpo.enabled is false")
        pool = dpo_round_pool(r[QUERIES], rnd, job.cfg.dpo.rounds, job.cfg.dpo.general_pool == "train")
        if not pool:
            return Skip(f"no queries of kinds {job.cfg.data.dpo_kinds} in round {rnd}'s share of the dpo split: "
                        f"{round_adapter(rnd)} not trained")
        return run_sample(pool, job.policy(), job.cfg, store, adapter="st-s" if rnd == 1 else round_adapter(rnd - 1),
                          emit=job.emit)

    return run


def _dpo_judge(rnd: int):
    def run(job: Job, r: Results, store) -> list[Any]:
        from .answer_judge import run_answer_judge

        return run_answer_judge(r[f"dpo-sample{round_suffix(rnd)}"], job.policy(), job.cfg, store)

    return run


def _dpo_pairs(rnd: int):
    def run(job: Job, r: Results, path: Path) -> dict[str, Any]:
        from .dpo_data import build_dpo_pairs, format_pair_table
        from .sft_data import write_jsonl

        x = round_suffix(rnd)
        pairs, stats = build_dpo_pairs(r[f"dpo-sample{x}"], r[f"dpo-judge{x}"], job.cfg, job.model_path)
        write_jsonl(path, pairs)
        job.emit(f"[dpo-pairs{x}] {len(pairs)} pairs -> {path}\n\n{format_pair_table(stats)}\n")
        return {"path": str(path), "pairs": len(pairs), "stats": stats}

    return run


def _train_st_d(rnd: int):
    def run(job: Job, r: Results, adapter_dir: Path) -> dict[str, Any] | Skip:
        from .runtime import init_ray
        from .train.dpo import train_dpo

        x = round_suffix(rnd)
        pairs = r[f"dpo-pairs{x}"]
        if not pairs["pairs"]:
            return Skip(f"no pair passed delta and max_length: {round_adapter(rnd)} not trained")
        start = r["sft-adapter"] if rnd == 1 else r[f"dpo-adapter{round_suffix(rnd - 1)}"]
        init_ray(job.cfg)
        job.emit(f"[{round_adapter(rnd)}] DPO on {pairs['pairs']} pairs from {'ST-S' if rnd == 1 else round_adapter(rnd - 1)}, "
                 f"{job.cfg.dpo.num_workers} Ray Train worker(s)")
        return train_dpo(pairs["path"], job.model_path, start["dir"], adapter_dir, job.cfg,
                         name=adapter_dir.name.replace("-adapter", ""), emit=job.emit,
                         on_step=_steps(job, f"dpo-adapter{x}"))

    return run


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
        row=Verdict, doc="every review candidate's answer judged (self-selected answers)")
    return [stage], ("review-judge",)


def _sft_rules() -> tuple:
    """The SFT target rules' version (`method.sft.RULES_VERSION`): data those rules would now build otherwise, and
    the adapter trained on it, get new keys. Version 1, the rules of the stores the pinned recipes found, adds
    nothing."""
    from safetrigger.method.sft import RULES_VERSION

    return () if RULES_VERSION == 1 else (("sft-rules", RULES_VERSION),)


def pipeline_stages(cfg: RunConfig | None = None) -> list[Stage]:
    """Self-generation to ST-D's eval answers. Each key recipe: the stage's config slice and its inputs' keys."""
    selection, selected = _selection_stages(cfg)
    # the answer opener and verdict word follow the self-judge's verdicts, so the review reads them (and their key)
    # only then
    opened = ("judge",) if cfg is not None and cfg.review.reads_verdicts() else ()
    return [
        Stage("generate", (QUERIES,), lambda c, k: (
            "generate", c.model.model_dump(),
            c.generation.model_dump(exclude=set(c.generation.OPERATIONAL)), k[QUERIES],
            *_weights(c)),
            _generate, row=Trajectory, doc="the policy answers every query: think1, answer1"),
        Stage("judge", ("generate",), lambda c, k: ("judge", k["generate"], c.judge.model_dump()), _judge,
              row=Judgement, doc="the policy judges its own reasoning (awareness)"),
        Stage("review", ("generate", *opened), lambda c, k: ("review", k["generate"], c.review.key_slice(),
                                                             c.judge.max_reasoning_tokens, *(k[s] for s in opened)),
              _review, row=Review, doc="unsafe training queries: <safe> block + answer2"),
        *selection,
        Stage("sft-data", ("generate", "review", *selected), lambda c, k: (
            k["review"], c.sft_data.model_dump(), *(k[s] for s in selected), *_sft_rules()), _sft_data,
              output="jsonl", doc="SFT targets (method.sft)"),
        Stage("sft-adapter", ("review", "sft-data", *selected), lambda c, k: (
            "sft", k["review"], c.sft_data.model_dump(), c.sft.key_fields(), *(k[s] for s in selected),
            *_sft_rules()), _train_st_s, output="adapter",
              publish="st-s", doc="ST-S: SFT on Ray Train, served as policy:st-s"),
        Stage("eval-st-s", ("sft-adapter", "generate"), lambda c, k: ("eval-st-s", k["sft-adapter"], k["generate"],
                                                                     *_block_room(c)),
              _eval_answers("st-s"), row=Trajectory, doc="ST-S answers the eval split"),
        *_dpo_round_stages(1),
        *(st for rnd in range(2, (cfg.dpo.rounds if cfg is not None else 1) + 1) for st in _dpo_round_stages(rnd)),
    ]


def _dpo_round_stages(rnd: int) -> list[Stage]:
    """One DPO round: sample from the previous adapter (ST-S for round 1), judge, pair, train on from it, answer
    the eval split. Round 1's names and keys are those of the single DPO step before rounds existed; with more
    than one round its pool is its share of the dpo split, which its sampling key says."""
    d = lambda c: c.dpo  # noqa: E731
    x, prev = round_suffix(rnd), "sft-adapter" if rnd == 1 else f"dpo-adapter{round_suffix(rnd - 1)}"
    share = lambda c: (() if c.dpo.rounds == 1 else (("round", rnd, c.dpo.rounds),)) + (  # noqa: E731
        () if c.dpo.general_pool == "dpo" else (("general_pool", c.dpo.general_pool),))
    return [
        Stage(f"dpo-sample{x}", (prev, QUERIES), lambda c, k: (
            "dpo-sample", k[prev], k[QUERIES], d(c).num_samples, d(c).temperature, d(c).top_p,
            d(c).max_tokens, d(c).seed, *share(c), *_general_sampled_lazily(c)), _dpo_sample(rnd), row=SampleSet,
            doc=f"{'ST-S' if rnd == 1 else round_adapter(rnd - 1)} samples k answers per held-apart query"),
        Stage(f"dpo-judge{x}", (f"dpo-sample{x}",), lambda c, k: (
            "dpo-judge", k[f"dpo-sample{x}"], d(c).judge.key_fields(), *_unsafe_only(c)),
              _dpo_judge(rnd), row=Verdict, doc="F_safe of every sample of an unsafe query"),
        Stage(f"dpo-pairs{x}", (f"dpo-sample{x}", f"dpo-judge{x}"), lambda c, k: (
            "dpo-pairs", k[f"dpo-judge{x}"], d(c).w_a, d(c).w_b, d(c).w_c, d(c).delta, d(c).max_length,
            *(() if d(c).rejected == "worst" else (d(c).rejected,)),
            *(() if d(c).general_pairs_per_unsafe is None else (("general_cap", d(c).general_pairs_per_unsafe),))),
              _dpo_pairs(rnd),
              output="jsonl", doc="chosen/rejected by the method's reward"),
        Stage(f"dpo-adapter{x}", (f"dpo-pairs{x}", prev), lambda c, k: (
            "dpo", k[f"dpo-pairs{x}"], {f: v for f, v in d(c).key_fields().items() if f not in ("judge", "enabled", "rejected")},
            *(() if rnd == 1 else (k[prev],))),
              _train_st_d(rnd), output="adapter", publish=round_adapter(rnd),
              doc=("ST-D: DPO on Ray Train from ST-S, served as policy:st-d" if rnd == 1 else
                   f"DPO round {rnd} from {round_adapter(rnd - 1)}, served as policy:{round_adapter(rnd)}")),
        Stage(f"eval-st-d{x}", (f"dpo-adapter{x}", "generate"), lambda c, k: (f"eval-st-d{x}", k[f"dpo-adapter{x}"], k["generate"],
                                                                                  *_block_room(c)),
              _eval_answers(round_adapter(rnd)), row=Trajectory, doc=f"{'ST-D' if rnd == 1 else round_adapter(rnd)} answers the eval split"),
    ]


def _pool_has_general(c: RunConfig) -> bool:
    """Whether the DPO pool holds general queries: the SFT split's (`dpo.general_pool: train`) or the dpo split's."""
    return c.dpo.general_pool == "train" or "general" in c.data.dpo_kinds


def _general_sampled_lazily(c: RunConfig) -> tuple:
    """Part of the DPO sampling key where general queries of its pool are sampled only until the cap on their pairs
    is met (`pipelines/sample.py`): a store of every general query's samples was written without that stop."""
    cap = c.dpo.general_pairs_per_unsafe
    return (("general_until_cap", cap),) if _pool_has_general(c) and cap else ()


def _unsafe_only(c: RunConfig) -> tuple:
    """Part of the DPO judge's key only where its pool holds general queries, whose samples it no longer judges
    (their pairs read no verdict): the keys of pools without them stay as they were."""
    return (("judged", "unsafe"),) if _pool_has_general(c) else ()


def judge_stage_name(judge: AnswerJudgeConfig, adapter: str) -> str:
    return f"eval-judge-{judge.name}-{adapter or 'base'}"


def _judge_run(model: str, adapter: str, answers: str, judge: AnswerJudgeConfig, metric: str):
    def run(job: Job, r: Results, store) -> list[Any] | Skip:
        from .answer_judge import judge_answers
        from .evaluate import model_records, suite_selected

        if not job.cfg.eval.enabled:
            return Skip("eval.enabled is false")
        rows = model_records(model, adapter, r[answers], {q.id: q for q in r[QUERIES]}, job.cfg, job.model_path)
        rows = suite_selected(rows, job.cfg, metric)
        items = [(x["query_id"], x["prompt"], x["answer"]) for x in rows]  # eval records (dicts: a column per judge)
        return judge_answers(items, job.policy(), judge, job.cfg, store, judge_stage_name(judge, adapter))

    return run


def eval_judge_stages(cfg: RunConfig) -> list[Stage]:
    """One stage per evaluated model and model judge (refusal match needs no stage); judges read the final answer
    only, always with the base weights, so base and candidates are judged alike."""
    from .evaluate import selecting_suites

    stages = []
    for model, adapter, answers in evaluated(cfg):
        for j in [j for j in cfg.eval.judges if j.type != "refusal"]:
            stages.append(Stage(judge_stage_name(j, adapter), (answers, QUERIES), lambda c, k, a=answers, j=j: (
                "eval-judge", k[a], j.key_fields(), c.model.max_model_len, selecting_suites(c, "asr")),
                _judge_run(model, adapter, answers, j, "asr"), row=Verdict,
                doc=f"judge {j.name} on {model}'s answers to the ASR suites' prompts"))
        if cfg.eval.xstest_judge is not None:
            j = cfg.eval.xstest_judge
            stages.append(Stage(judge_stage_name(j, adapter), (answers, QUERIES), lambda c, k, a=answers, j=j: (
                "eval-xstest", k[a], j.key_fields(), c.model.max_model_len, selecting_suites(c, "over_refusal")),
                _judge_run(model, adapter, answers, j, "over_refusal"), row=Verdict,
                doc=f"XSTest classes of {model}'s over-refusal answers"))
    return stages


def main_graph(cfg: RunConfig) -> list[Stage]:
    return pipeline_stages(cfg) + eval_judge_stages(cfg)
