"""Experiment tracking and the model registry in MLflow, beside the run's own files.

A main job is one MLflow run: the whole config and the data counts as params, one nested run per stage with its
time, rows and tokens, every training step of SFT and DPO (rank 0's logs: loss, learning rate, grad norm, DPO
rewards and margins, tokens/s), every report metric with its interval, the report, summary and tables as
artifacts. Each published adapter version becomes a version of a registered model (`<served_name>-<adapter>`)
carrying its file-registry version, stage key, metrics, gate decision and a model card; the promoted one gets
the alias `production`.

The file registry (`services/adapters.py`, `PROMOTED.json`) stays what replicas and the gateway read: it needs
no server and works offline on every node of the shared volume; MLflow mirrors it for people to browse and
compare. The embedded default stores everything under the output's parent (`mlflow.db`, `mlruns/`): nothing to
start, and runs of several configs land in one store. A tracking failure never stops the pipeline: it is said
once and tracking stops.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from safetrigger.config import RunConfig

from .stages import round_adapter

PRODUCTION = "production"


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted MLflow params (MLflow keeps at most 6000 characters of a value)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value[:6000]}


def metric_name(*parts: str) -> str:
    """MLflow accepts letters, digits, `_ - . / ` and space in a metric name."""
    return "/".join("".join(c if c.isalnum() or c in "_-. /" else "_" for c in p) for p in parts)


def report_metrics(data: dict[str, Any]) -> dict[str, float]:
    """metrics.json as flat MLflow metrics: every rate with its 95% interval, every paired change vs base with its
    interval, the trigger's recall / false alarm / precision per model."""
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)

    for m in data.get("suites", []):
        name = metric_name(m["model"], m["suite"], m["metric"], m["judge"])
        add(name, m["rate"])
        add(f"{name}/ci_lo", m["ci95"][0])
        add(f"{name}/ci_hi", m["ci95"][1])
    for cand, changes in data.get("comparisons", {}).items():
        for c in changes:
            name = metric_name("change", cand, c["suite"], c["metric"], c["judge"])
            add(name, c["delta"]["value"])
            add(f"{name}/ci_lo", c["delta"]["lo"])
            add(f"{name}/ci_hi", c["delta"]["hi"])
    for model, t in data.get("trigger", {}).items():
        for field in ("recall", "false_alarm", "precision"):
            add(metric_name("trigger", model, field), t.get(field))
    return out


def model_card(adapter: str, cfg: RunConfig, key: str, data: dict[str, Any], summary: dict[str, Any],
               decision: dict[str, Any] | None) -> str:
    """A Markdown card for one adapter version: what it was trained from and how, what it measured, and the
    gate's word on it."""
    display = {"st-s": "ST-S", "st-d": "ST-D"}.get(adapter) or adapter.replace("st-d-r", "ST-D r")
    changes = [c for c in data.get("comparisons", {}).get(display, []) if c["judge"] in (cfg.eval.gate.judge, "refusal", "exact_match")]
    lines = [f"# {cfg.model.served_name}-{adapter} ({display})", "",
             f"- base model: `{cfg.model.source}`", f"- run: `{cfg.name}`, stage key `{key}`",
             f"- data: {summary.get('queries', 0)} queries; SFT examples kept {summary.get('sft_data', {}).get('kept', {})}; "
             f"DPO pairs {sum(c.get('pairs', 0) for c in _round_pairs(adapter, summary).get('per_kind', {}).values())}",
             f"- LoRA r{cfg.sft.lora.r} alpha {cfg.sft.lora.alpha} dropout {cfg.sft.lora.dropout}",
             "- gate: " + ("not decided" if decision is None else ("**promoted**" if decision.get("promote") else "rejected")
                           + "".join(f"\n  - {r}" for r in decision.get("reasons", []))),
             "", "| suite | metric | judge | base | this | change [95% CI] |", "|---|---|---|---:|---:|---|"]
    for c in changes:  # metrics.json writes an unmeasured number (no examples) as null
        d = c["delta"]
        lines.append(f"| {c['suite']} | {c['metric']} | {c['judge']} | {_pct(c['base'])} | {_pct(c['candidate'])} | "
                     + ("–" if None in (d["value"], d["lo"], d["hi"]) else
                        f"{100 * d['value']:+.1f} pp [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]") + " |")
    return "\n".join(lines) + "\n"


def _round_pairs(adapter: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The pair statistics of the DPO round that trained `adapter` (`st-d-r2`: round 2's), by the stages' own adapter
    names; ST-S's card, and a summary that lists no rounds, show round 1's."""
    rounds = {round_adapter(x["round"]): x.get("pairs") or {} for x in summary.get("dpo_rounds", [])}
    if adapter in rounds:
        return rounds[adapter]
    return (summary.get("dpo_pairs") or {}) if adapter in ("st-s", round_adapter(1)) else {}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


class Tracker:
    """MLflow for one main job; every method is a no-op when tracking is off or has failed."""

    def __init__(self, cfg: RunConfig, out: Path, emit: Callable[[str], None]) -> None:
        self.cfg, self.out, self.emit = cfg, out.resolve(), emit
        self.client = None
        self.run_id = ""
        self.stage_runs: dict[str, str] = {}
        self.versions: dict[str, tuple[str, str]] = {}  # adapter -> (registered model, version)
        self.seconds = 0.0  # wall time spent in MLflow calls (the driver's and the training follower's)
        if cfg.tracking.enabled:
            self._guard(self._start)

    @property
    def uri(self) -> str:
        return self.cfg.tracking.uri or f"sqlite:///{self.out.parent / 'mlflow.db'}"

    def _guard(self, fn, *args, **kwargs) -> Any:
        if not self.cfg.tracking.enabled or (self.client is None and fn != self._start):
            return None
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a tracking store that fails must not cost the run
            self.emit(f"[tracking] stopped: {type(e).__name__}: {e}")
            self.client = None
            return None
        finally:
            self.seconds += time.monotonic() - started

    def _start(self) -> None:
        from mlflow import MlflowClient

        t = self.cfg.tracking
        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        exp = client.get_experiment_by_name(t.experiment)
        if exp is None:  # a local store keeps its artifacts beside its database; a server decides for itself
            db = self.uri.removeprefix("sqlite:///")
            local = str(Path(db).parent / "mlruns") if self.uri.startswith("sqlite:///") else None
            # the UI opens an experiment of this kind on its training-runs view (MLflow 3 defaults to GenAI traces)
            exp_id = client.create_experiment(t.experiment, artifact_location=local,
                                              tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            exp_id = exp.experiment_id
        own = {"safe_trigger.output_dir": str(self.out), "safe_trigger.model": self.cfg.model.source,
               **({"safe_trigger.key": t.key} if t.key else {}), **({"safe_trigger.job": t.job} if t.job else {})}
        run = client.create_run(exp_id, run_name=self.cfg.name, tags={**t.tags, **own})
        self.client, self.exp_id, self.run_id = client, exp_id, run.info.run_id
        self.emit(f"[tracking] MLflow run {self.run_id} in {self.uri} (experiment {t.experiment!r})")

    def params(self, counts: dict[str, int]) -> None:
        def log() -> None:
            from mlflow.entities import Param

            values = {**flat_params(self.cfg.model_dump(mode="json")),
                      **{f"data.count.{k}": str(v) for k, v in sorted(counts.items())}}
            items = [Param(k, v) for k, v in values.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(self.run_id, params=items[i:i + 100])

        self._guard(log)

    def _stage_run(self, stage: str) -> str:
        if stage not in self.stage_runs:
            run = self.client.create_run(self.exp_id, run_name=stage, tags={"mlflow.parentRunId": self.run_id})
            self.stage_runs[stage] = run.info.run_id
        return self.stage_runs[stage]

    def stage(self, stage: str, key: str, metrics: dict[str, float], adapter_dir: Path | None = None) -> None:
        """A finished stage: its nested run gets its key, numbers and, for an adapter stage, the adapter."""
        def log() -> None:
            run_id = self._stage_run(stage)
            self.client.set_tag(run_id, "safe_trigger.stage_key", key)
            self._log_metrics(run_id, metrics)
            if adapter_dir is not None and self.cfg.tracking.log_adapters:
                self.client.log_artifacts(run_id, str(adapter_dir), "adapter")
            self.client.set_terminated(run_id)

        self._guard(log)

    def step_logger(self, stage: str) -> Callable[[int, dict[str, float]], None]:
        """Per-step training metrics into the stage's nested run."""
        def log(step: int, metrics: dict[str, float]) -> None:
            self._guard(lambda: self._log_metrics(self._stage_run(stage), {metric_name(k): v for k, v in metrics.items()},
                                                  step))

        return log

    def _log_metrics(self, run_id: str, values: dict[str, Any], step: int = 0) -> None:
        """The finite numbers of `values`, in batches (MLflow takes at most 1000 metrics per call)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def register(self, adapter: str, version: int, stage: str, key: str, adapter_dir: Path) -> None:
        """A file-registry version of `adapter` as a version of the registered model `<served_name>-<adapter>`."""
        def log() -> None:
            name = f"{self.cfg.model.served_name}-{adapter}"
            if not self._has_model(name):
                self.client.create_registered_model(name, tags={"safe_trigger.adapter": adapter})
            run_id = self._stage_run(stage)
            source = (f"{self.client.get_run(run_id).info.artifact_uri}/adapter" if self.cfg.tracking.log_adapters
                      else str(adapter_dir))
            mv = self.client.create_model_version(name, source=source, run_id=run_id, tags={
                "safe_trigger.registry_version": str(version), "safe_trigger.stage_key": key,
                "safe_trigger.run": self.cfg.name, "safe_trigger.base_model": self.cfg.model.source})
            self.versions[adapter] = (name, mv.version)

        self._guard(log)

    def _has_model(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def evaluation(self, metrics_json: Path, report_dir: Path, decisions: list[dict[str, Any]],
                   promoted: dict[str, Any] | None, cards: dict[str, str]) -> None:
        """Every report metric with its interval, the report as artifacts, and each adapter version's decision,
        model card and (when promoted) the `production` alias."""
        def log() -> None:
            self._log_metrics(self.run_id, report_metrics(json.loads(metrics_json.read_text())))
            self.client.log_artifacts(self.run_id, str(report_dir), "report")
            by_adapter = {d["candidate"]: d for d in decisions}
            for adapter, (name, version) in self.versions.items():
                d = by_adapter.get(adapter)
                self.client.set_model_version_tag(name, version, "safe_trigger.gate",
                                                  "none" if d is None else "pass" if d["promote"] else "rejected")
                if adapter in cards:
                    self.client.update_model_version(name, version, description=cards[adapter])
                if promoted and promoted.get("name") == adapter:
                    self.client.set_registered_model_alias(name, PRODUCTION, version)

        self._guard(log)

    def artifact(self, path: Path) -> None:
        self._guard(lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, ok: bool = True) -> None:
        self._guard(lambda: self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED"))
