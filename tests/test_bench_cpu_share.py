"""bench/cpu_share.py: who held the cores while a trainer computed (bench/training.py's reason column)."""

import subprocess
import sys
import time

from bench.cpu_share import CpuSampler, label, shares, training_window


def test_labels_group_ray_actors_python_scripts_and_binaries():
    assert label(["ray::TrainController.run"], "python") == "ray::TrainController"
    assert label(["ray::RayTrainWorker                                  "], "python") == "ray::RayTrainWorker"
    assert label(["/v/bin/python", "-u", "/v/lib/ray/_private/log_monitor.py", "--x"], "python") == "log_monitor.py"
    assert label(["/v/lib/ray/core/src/ray/raylet/raylet", "--a=1"], "raylet") == "raylet"
    assert label([], "kdamond.0") == "kdamond.0"


def test_the_window_is_where_the_trainer_was_busy_and_others_are_counted_inside_it_only():
    sampler = CpuSampler()
    # the trainer: idle for 2 s (start-up), 2 cores for 4 s, idle again; a poller: 0.1 core throughout, and a
    # process that burnt a whole core before the window only
    sampler.series = {
        1: [(0, 0), (1, 0.2), (2, 0.4), (3, 2.4), (4, 4.4), (5, 6.4), (6, 8.4), (7, 8.5)],
        2: [(t, 0.1 * t) for t in range(8)],
        3: [(0, 0), (1, 1), (2, 2), (3, 2), (4, 2)],
    }
    sampler.labels = {1: "ray::RayTrainWorker", 2: "ray::TrainController", 3: "pip"}
    assert training_window(sampler.series[1], threads=2) == (2, 6)
    got = shares(sampler, "ray::RayTrainWorker", threads=2)
    assert got["window_s"] == 4 and abs(got["trainer_cores"] - 2.0) < 1e-9
    assert abs(got["other_cores"] - 0.1) < 1e-9
    assert [lab for lab, _ in got["top_others"]] == ["ray::TrainController"]  # the earlier burner is outside it
    assert shares(sampler, 1, threads=2)["trainer_cores"] == got["trainer_cores"]  # by pid as by label
    assert shares(sampler, "ray::Nobody", threads=2) == {}
    # two workers of one label are one trainer, the window the busier one's
    sampler.series[4] = [(t, 0.5 * t) for t in range(8)]
    sampler.labels[4] = "ray::RayTrainWorker"
    both = shares(sampler, "ray::RayTrainWorker", threads=2)
    assert both["window_s"] == 4 and abs(both["trainer_cores"] - 2.5) < 1e-9 and abs(both["other_cores"] - 0.1) < 1e-9


def test_a_real_busy_process_is_seen_using_its_core():
    sampler = CpuSampler(period_s=0.2)
    sampler.start()
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2.5: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    busy.wait()
    time.sleep(0.5)
    sampler.stop()
    got = shares(sampler, busy.pid, threads=1)
    assert got and 1.5 < got["window_s"] <= 2.6 and 0.8 < got["trainer_cores"] <= 1.05, got
