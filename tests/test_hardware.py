"""Precision by capability: parsed from real /proc/cpuinfo text of the two CPUs this project runs on."""

import os

import pytest

from safetrigger.config import RunConfig
from safetrigger.hardware import choose_dtype, parse_cpuinfo, this_cpu, training_precision

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes vpclmulqdq rdpid fsrm
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx2 fma
"""

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
"""

SKYLAKE_AVX512 = """model name\t: Intel(R) Xeon(R) CPU @ 2.00GHz
flags\t\t: fpu avx avx2 fma avx512f avx512dq avx512bw avx512vl
"""


def test_avx2_epyc_gets_float32_for_serving_and_training():
    cpu = parse_cpuinfo(EPYC_AVX2)
    assert cpu.model == "AMD EPYC 7B13" and cpu.logical_cpus == 2 and not cpu.native_bf16
    assert cpu.simd() == ["avx2", "fma"]
    assert choose_dtype("auto", "cpu", cpu).dtype == "float32"
    assert not training_precision("auto", False, cpu).bf16


def test_amx_xeon_gets_bfloat16():
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.native_bf16 and "amx_bf16" in cpu.simd()
    choice = choose_dtype("auto", "cpu", cpu)
    assert choice.dtype == "bfloat16" and "amx_bf16" in choice.reason and choice.warning is None
    assert training_precision("auto", False, cpu).bf16


def test_avx512_without_bf16_instructions_is_not_native():
    # torch's mkldnn bf16 check says yes here; the CPU still emulates bf16 matmuls
    cpu = parse_cpuinfo(SKYLAKE_AVX512)
    assert not cpu.native_bf16 and choose_dtype("auto", "cpu", cpu).dtype == "float32"


def test_gpu_auto_is_bfloat16_whatever_the_host_cpu():
    assert choose_dtype("auto", "gpu", parse_cpuinfo(EPYC_AVX2)).dtype == "bfloat16"
    assert training_precision("auto", True, parse_cpuinfo(EPYC_AVX2)).bf16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_explicit_slow_dtype_is_honoured_with_a_warning(dtype):
    choice = choose_dtype(dtype, "cpu", parse_cpuinfo(EPYC_AVX2))
    assert choice.dtype == dtype and choice.reason == "explicit"
    assert "emulated" in choice.warning and "AMD EPYC 7B13" in choice.warning


def test_explicit_fast_dtype_has_no_warning():
    assert choose_dtype("float32", "cpu", parse_cpuinfo(EPYC_AVX2)).warning is None
    assert choose_dtype("bfloat16", "cpu", parse_cpuinfo(SAPPHIRE_RAPIDS)).warning is None
    assert choose_dtype("bfloat16", "gpu", parse_cpuinfo(EPYC_AVX2)).warning is None


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float8"):
        choose_dtype("float8", "cpu", parse_cpuinfo(EPYC_AVX2))


def test_the_default_config_is_auto_and_the_engine_gets_this_cpus_choice(model_path):
    from services.policy import build_llm_config

    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]}})
    assert cfg.model.dtype == "auto" and cfg.sft.precision == "auto"
    expected = "bfloat16" if this_cpu().native_bf16 else "float32"
    assert build_llm_config(cfg, model_path).engine_kwargs["dtype"] == expected


def test_precision_report_names_the_cpu_and_each_choice():
    from pipelines.runtime import emit_precision, precision_report

    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                    "model": {"dtype": "bfloat16"}})
    report = precision_report(cfg)
    lines: list[str] = []
    emit_precision(report, lines.append)
    assert report["cpu"]["model"] == this_cpu().model and set(report) == {"cpu", "serving", "sft", "dpo"}
    assert this_cpu().model in lines[0] and "serving bfloat16" in lines[0]
    assert any("WARNING (serving)" in ln for ln in lines) == (not this_cpu().native_bf16)


@pytest.mark.parametrize("cpus, host, given, expected, reserved", [
    (2, 2, None, 2, 0),     # 2 cores: the engine computes on both, vLLM's binding keeps none back
    (4, 16, None, 4, None),  # a big host: the replica's own CPUs, vLLM's default binding
    (16, 16, None, 16, 0),
    (8, 4, None, 4, 0),     # never more threads than the host has
    (1, 1, None, 1, 0),
    (2, 2, 1, 1, None),     # explicit wins: one core for the engine, vLLM reserves the other
])
def test_engine_threads_use_the_replicas_cpus(cpus, host, given, expected, reserved):
    from services.policy_rules import engine_threads, reserved_cpus

    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                    "serving": {"cpus_per_replica": cpus, "engine_threads": given}})
    assert engine_threads(cfg, host_cpus=host) == expected
    assert reserved_cpus(cfg, host_cpus=host) == reserved


@pytest.mark.parametrize("serving, expected", [
    ({}, 32),                                                      # CPU: small blocks, so the prefix cache hits
    ({"kv_block_size": 64}, 64),                                   # the field wins
    ({"kv_block_size": 64, "engine_kwargs": {"block_size": 128}}, 128),  # raw engine arguments win over both
    ({"accelerator": "gpu"}, None),                                # GPU: vLLM's own default, nothing passed
    ({"accelerator": "gpu", "kv_block_size": 32}, 32),
])
def test_the_engine_is_given_the_kv_block_size(model_path, serving, expected):
    from services.policy import build_llm_config

    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                    "serving": serving})
    assert build_llm_config(cfg, model_path).engine_kwargs.get("block_size") == expected


@pytest.mark.parametrize("accelerator, size", [("gpu", 8), ("gpu", 24), ("gpu", 0), ("cpu", 16), ("cpu", 48)])
def test_a_kv_block_size_the_engines_kernels_do_not_take_is_refused(accelerator, size):
    # GPU: multiples of 16; CPU: of 32 (vLLM-CPU's attention)
    with pytest.raises(ValueError, match="kv_block_size"):
        RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                  "serving": {"accelerator": accelerator, "kv_block_size": size}})


def test_a_gpu_takes_kv_blocks_of_16():
    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                    "serving": {"accelerator": "gpu", "kv_block_size": 16}})
    assert cfg.serving.kv_block_size == 16


def test_the_replica_environment_carries_the_engine_threads(model_path):
    from services.policy_rules import engine_threads
    from services.policy import build_llm_config

    cfg = RunConfig.model_validate({"data": {"sources": [{"type": "advbench", "path": "a.jsonl"}]},
                                    "serving": {"cpus_per_replica": 2}})
    env = build_llm_config(cfg, model_path).runtime_env["env_vars"]
    assert env["OMP_NUM_THREADS"] == str(engine_threads(cfg)) and int(env["OMP_NUM_THREADS"]) >= 1
    # the driver's own thread caps (set_threads) reach Ray's workers: the engine's must override every one of them
    assert env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"]
    assert ("VLLM_CPU_NUM_OF_RESERVED_CPU" in env) == (engine_threads(cfg) >= (os.cpu_count() or 1))


def test_tcmalloc_goes_first_on_ld_preload_and_keeps_what_the_caller_preloads(tmp_path):
    from safetrigger.hardware import tcmalloc_library, with_preload

    lib = tmp_path / "libtcmalloc_minimal.so.4"
    assert tcmalloc_library((str(tmp_path / "missing.so"),)) is None
    lib.write_bytes(b"")
    assert tcmalloc_library((str(tmp_path / "missing.so"), str(lib))) == str(lib)
    assert with_preload({"A": "1"}, None, "/x.so") == {"A": "1"}
    assert with_preload({}, str(lib), None) == {"LD_PRELOAD": str(lib)}
    assert with_preload({}, str(lib), f"/x.so:{lib}:/y.so") == {"LD_PRELOAD": f"{lib}:/x.so:/y.so"}


def test_training_workers_get_the_configured_allocator(monkeypatch):
    import safetrigger.hardware as hw
    from pipelines.train.ray_train import allocator_in_use, worker_env
    from safetrigger.config import TrainSettings

    monkeypatch.setattr(hw, "tcmalloc_library", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert worker_env(TrainSettings()) == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    assert worker_env(TrainSettings(allocator="system")) == {}
    # the allocator does not change the trained weights: it stays out of the stage key
    assert TrainSettings(allocator="system").key_fields() == TrainSettings().key_fields()
    assert allocator_in_use("/nonexistent/maps") == "an unknown allocator"


def test_the_allocator_line_reads_what_the_process_mapped(tmp_path):
    from pipelines.train.ray_train import allocator_in_use

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator_in_use(str(maps)) == "the system malloc"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert allocator_in_use(str(maps)) == "tcmalloc"
