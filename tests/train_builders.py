"""Trainer builders for Ray Train tests: the pipeline's own, with a fault or a delay put in on the workers (a
module the workers import by name, as `fit` takes its builder)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def sft_trainer_slow_to_save_and_recorded(c):
    """The pipeline's SFT trainer; rank 0 takes 3 s longer to write each checkpoint (as a large model's does), and
    every rank records which step the checkpoint it hands Ray Train holds (`c["record"]`, one JSON line each)."""
    import ray.train

    from pipelines.train.sft import build_sft_trainer

    trainer = build_sft_trainer(c)
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        save = trainer._save_checkpoint

        def slow_save(*args, **kwargs):
            time.sleep(3)
            return save(*args, **kwargs)

        trainer._save_checkpoint = slow_save
    report = ray.train.report

    def recorded_report(metrics, checkpoint=None, **kwargs):
        copied = None
        if checkpoint is not None:
            state = Path(checkpoint.path) / "checkpoint" / "trainer_state.json"
            copied = json.loads(state.read_text())["global_step"] if state.is_file() else "no trainer_state.json"
        with open(c["record"], "a") as f:
            f.write(json.dumps({"rank": rank, "step": trainer.state.global_step, "copied": copied}) + "\n")
        return report(metrics, checkpoint=checkpoint, **kwargs)

    ray.train.report = recorded_report
    return trainer
