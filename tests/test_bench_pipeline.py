"""bench/pipeline.py: per-stage times against the previous run, from the summaries the main job writes."""

import json
import sys

from pipelines.run import write_summary
from safetrigger.artifacts import PREVIOUS_SUMMARY

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import pipeline as bench  # noqa: E402


def test_write_summary_keeps_the_one_it_replaces(tmp_path):
    write_summary(tmp_path, {"timings": {"generate_s": 100.0}})
    write_summary(tmp_path, {"timings": {"generate_s": 150.0}})
    assert json.loads((tmp_path / "summary.json").read_text())["timings"]["generate_s"] == 150.0
    assert json.loads((tmp_path / PREVIOUS_SUMMARY).read_text())["timings"]["generate_s"] == 100.0


def test_compare_flags_a_slower_stage_and_takes_skipped_stages_from_the_store_times():
    now = {"timings": {"generate_s": 150.0, "st-s_train_s": 90.0, "total_s": 400.0},
           "stage_times": [{"stage": "judge", "rows": 10, "seconds": 30.0}]}
    before = {"timings": {"generate_s": 100.0, "st-s_train_s": 100.0, "judge_s": 30.0, "total_s": 380.0}}
    table = bench.compare(now, before)
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert "1.50 SLOWER" in lines["generate"] and "| 0.90 |" in lines["st-s_train"]
    assert "| 1.00 |" in lines["judge"] and table.splitlines()[-1].startswith("| total |")


def test_cpu_line_reads_the_recorded_precision():
    summary = {"precision": {"cpu": {"model": "AMD EPYC 7B13", "logical_cpus": 2, "simd": ["avx2", "fma"]},
                             "serving": {"dtype": "float32"}, "sft": {"dtype": "float32"}, "dpo": {"dtype": "float32"}}}
    assert bench.cpu_line(summary) == "AMD EPYC 7B13 (2 CPUs, avx2 fma); serving float32, SFT float32, DPO float32"
    assert "not recorded" in bench.cpu_line({})


def test_training_share_of_peak_arithmetic_and_the_gemm_probe():
    import training as train_bench

    assert train_bench.training_gflops(10.0, 100_000_000) == 4.0  # 4 FLOP per parameter per token, in GFLOP/s
    assert train_bench.gemm_peak_gflops(1, n=128, seconds=0.05) > 0.1
