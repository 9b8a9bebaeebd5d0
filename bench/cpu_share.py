"""Who holds the cores while a trainer trains: every process's CPU time, sampled twice a second.

`bench/training.py` runs one sampler beside each path. Over the window where the trainer computed (the span of
its samples above three quarters of its threads' cores) it reports the cores the trainer used and those every
other process took from it: on 2 cores Ray Train's own actors each poll at about 1% of a core, and an OpenMP team
of 2 threads waits for whichever thread such a process preempted.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

BUSY_SHARE = 0.75  # of the trainer's threads: a sample above it is inside the training window
_TRAINER = "<trainer>"  # the trainer processes' key among the labels


def label(cmdline: list[str], name: str) -> str:
    """A process's group: Ray's actor or worker title (`ray::TrainController`), else its program's name."""
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    if Path(first).name.startswith("python") and len(cmdline) > 1:
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        return Path(script).name or Path(first).name
    return Path(first).name or name


class CpuSampler(threading.Thread):
    """Samples (time, CPU seconds) of every process on the machine until `stop()`; its own process is left out
    unless it is the trainer (`include_self`)."""

    def __init__(self, period_s: float = 0.5, include_self: bool = False) -> None:
        super().__init__(daemon=True)
        self.period_s, self.include_self = period_s, include_self
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.labels: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        me = os.getpid()
        while not self._stop_event.is_set():
            now = time.monotonic()
            for p in psutil.process_iter():
                if p.pid == me and not self.include_self:
                    continue
                try:
                    with p.oneshot():
                        cpu = p.cpu_times()
                        self.labels[p.pid] = label(p.cmdline(), p.name())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.series.setdefault(p.pid, []).append((now, cpu.user + cpu.system))
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _used_between(series: list[tuple[float, float]], a: float, b: float) -> float:
    """CPU seconds a process used in [a, b], from its samples (none before it started, none after it ended)."""
    def at(t: float) -> float:
        before = [cpu for when, cpu in series if when <= t]
        return before[-1] if before else 0.0

    return max(0.0, at(b) - at(a))


def training_window(series: list[tuple[float, float]], threads: int) -> tuple[float, float] | None:
    busy = [(t0, t1) for (t0, c0), (t1, c1) in zip(series, series[1:])
            if t1 > t0 and (c1 - c0) / (t1 - t0) > BUSY_SHARE * threads]
    return (busy[0][0], busy[-1][1]) if busy else None


def shares(sampler: CpuSampler, trainer: int | str, threads: int, top: int = 4) -> dict:
    """Cores used in the training window by the trainer (a pid, or every process of that label: all Ray Train
    workers) and by all other processes together, with the `top` of them. The window is the busiest trainer
    process's, `threads` that process's threads."""
    trainers = {pid for pid, lab in sampler.labels.items() if pid == trainer or lab == trainer}
    if not trainers:
        return {}
    busiest = max(trainers, key=lambda pid: sampler.series[pid][-1][1] - sampler.series[pid][0][1])
    window = training_window(sampler.series[busiest], threads)
    if window is None:
        return {}
    a, b = window
    used: Counter[str] = Counter()
    for pid, series in sampler.series.items():
        used[_TRAINER if pid in trainers else sampler.labels[pid]] += _used_between(series, a, b) / (b - a)
    trainer_cores = used.pop(_TRAINER)
    return {"window_s": b - a, "trainer_cores": trainer_cores, "other_cores": sum(used.values()),
            "top_others": [[lab, cores] for lab, cores in used.most_common(top) if cores >= 0.005]}
