import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safetrigger.config import default_data_root  # noqa: E402

DATA = Path(default_data_root())

# Short Ray Train fits in the stack tests: one worker computing on both cores. On these 2-core VMs two processes
# that first touch memory at the same time each pay ~5x the kernel time of one alone (two plain SFT processes of
# one thread side by side: 12-18 s of system time each, 2.8 s alone; `perf`: 54% of a worker's samples in
# clear_page_erms), so a 2-step SFT fit took 55-70 s with two workers and 27-35 s with one (AVX2 EPYC,
# interleaved). Two workers stay proven where they are the point: tests/test_train.py, tests/test_multinode.py.
TRAIN_ONE_WORKER = {"num_workers": 1, "torch_threads": 2, "cpus_per_worker": 2}

# The modules with a stack of their own, in two groups. `make test` runs them after every other test, in one
# process (`--stack-modules=only`; the stacks are CPU-bound on 2 cores, see the Makefile), or with TEST_WORKERS=2
# side by side (two pytest processes, `--dist loadgroup`): each group in one process, in the order given. test_train
# comes before test_multinode in one process: the reference run both fault tests compare with (`six_step_sft`) is
# trained there once, on a local cluster, and the node-loss test reuses it.
# Measured alone on 2 cores / 24 GiB (seconds; peak used memory of the machine):
#   engines-a: test_stack 339 s 12.6 GiB, test_multinode 190 s 11.3 GiB, test_train 60 s 6.0 GiB (test_multinode
#              now also runs the think model's main job, once test_think_stack's, 139 s 10.7 GiB alone: in one
#              process at stop 50 it took 210 s and the machine's used memory peaked at 10.0 GiB, `free` each second)
#   engines-b: test_gateway 246 s 8.0 GiB; the other modules ~70 s, <= 3.9 GiB
# With about 1.8 GiB used before a stack starts, the worst pair at once (test_stack beside test_gateway) holds
# ~19 GiB, below Ray's memory monitor (95%); two modules of engines-a side by side would reach 21.5-22 GiB, so
# they never share the machine.
STACK_GROUPS = {"engines-a": ("test_stack.py", "test_train.py", "test_multinode.py"),
                "engines-b": ("test_gateway.py",)}


def _group(nodeid: str) -> str | None:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return next((g for g, modules in STACK_GROUPS.items() if module in modules), None)


STACK_ORDER = [m for modules in STACK_GROUPS.values() for m in modules]


def _rank(name: str) -> int:
    return STACK_ORDER.index(name) if name in STACK_ORDER else len(STACK_ORDER)


def pytest_addoption(parser):
    parser.addoption("--stack-modules", choices=("all", "only", "skip"), default="all",
                     help="collect only the modules of STACK_GROUPS, or every module but them (`make test` runs the "
                          "two apart); neither imports the modules it leaves out")


def pytest_ignore_collect(collection_path, config):
    which = config.getoption("--stack-modules")
    if which == "all" or not collection_path.name.startswith("test_") or collection_path.suffix != ".py":
        return None
    return True if (collection_path.name in STACK_ORDER) == (which == "skip") else None


def pytest_configure(config):
    # `make test`'s first phase spreads the tests outside the stack modules over pytest processes (pytest-xdist):
    # each takes its share of the cores. In one process those 648 tests took 107-109 s at one thread against 118-124 s
    # at torch's default two (interleaved, 2-core AVX512-BF16 EPYC).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        from pipelines.runtime import set_threads

        set_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    # Outside the stack modules, the stack-marked tests (real training steps, the think model) first: pytest-xdist
    # hands each process a run of consecutive tests at the start, so one process runs them one after the other while
    # the other runs the short ones. Last in their modules' order, two of them met at the end in both processes and
    # took 34 and 19 s against 11 and 12: `make test`'s first phase 70-72 s against 88-91 (interleaved, 2-core EPYC).
    items.sort(key=lambda item: (_rank(item.path.name), item.get_closest_marker("stack") is None))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups of STACK_GROUPS: a group is one unit of work (one process runs it all), every
    other test a unit of its own. Done here because xdist 3.8 marks a group by renaming the test's node id, which
    pytest 9.2 no longer lets it do (`xdist_group` marks are silently ignored there: measured, both stacks' modules
    were split over the two processes and their module fixtures started twice)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class StackGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or nodeid

    return StackGroups(config, log)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "advbench.jsonl").is_file():
        pytest.fail(f"shared datasets not found at {DATA}; set SAFE_TRIGGER_DATA")
    return DATA


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model_path() -> str:
    """The embedded default model, converted once into the cache (its tokenizer and chat template are real)."""
    from safetrigger.model_cache import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def think_model_path() -> str:
    """The embedded reasoning model, built once into the cache (minutes; see safetrigger/think_model.py)."""
    from safetrigger.model_cache import resolve_model

    return resolve_model("embedded:smollm2-135m-think")


def random_adapter(model_path, out, seed, rank=8):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def tiny_adapter(out, tag: str = "a", rank: int = 2, shapes=(("model.layers.0.self_attn.q_proj", 4, 6),)):
    """A structurally valid LoRA adapter of hand-made shapes (module, in, out), for registry logic without a base."""
    import json

    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(sum(map(ord, tag)))
    tensors = {}
    for module, fan_in, fan_out in shapes:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16, "tag": tag}))
    return out


def stream_text(base, path, body, key):
    """The text a client sees from a gateway stream, and the last chunk's choice."""
    import json

    import httpx

    chunks = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[5:]))
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    text = "".join(ch.get("text") or (ch.get("delta") or {}).get("content") or "" for ch in choices)
    return text, choices[-1]


def sft_examples(path: Path, model_path: str, n: int = 16, answer=lambda i: f"It is {i}.") -> Path:
    """`n` prompt/completion SFT examples on the model's own chat template, one JSON line each."""
    import json

    from pipelines.chat import load_tokenizer, prompt_completion_text

    tok = load_tokenizer(model_path)
    with path.open("w") as f:
        for i in range(n):
            prompt, completion = prompt_completion_text(tok, [{"role": "user", "content": f"question {i}"}],
                                                        f"Thinking {i}.\n\n{answer(i)}")
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def six_step_sft_config(data_root: Path, **sft):
    """Two-worker SFT of 6 steps with a checkpoint every 2, one restart allowed: the run both fault tests train
    (a worker killed: tests/test_train.py; a node lost: tests/test_multinode.py)."""
    from safetrigger.config import RunConfig

    return RunConfig.model_validate({
        "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]},
        "sft_data": {"max_length": 256},
        "sft": {"num_workers": 2, "max_steps": 6, "per_device_batch_size": 1, "lora": {"r": 8, "alpha": 16},
                "learning_rate": 1e-3, "checkpoint_every_steps": 2, "max_failures": 1, **sft},
    })


# The pipeline's SFT trainer with rank 0 slow to save and every rank's reported checkpoint recorded
RECORDED_SFT = "tests.train_builders:sft_trainer_slow_to_save_and_recorded"

# `six_step_sft_config`'s run in a process of its own: argv = config JSON, data, adapter directory (its name names
# the run), and optionally a file where every rank records the checkpoint it reported (then rank 0 is slow to save:
# tests/train_builders.py). As a Ray Job (tests/test_multinode.py) it joins the job's cluster through RAY_ADDRESS;
# elsewhere it starts a local cluster of its own (`six_step_sft`).
TRAIN_SFT = """import json, os, sys
from pathlib import Path
from pipelines.runtime import init_ray
from pipelines.train.ray_train import fit
from pipelines.train.sft import sft_loop_config, train_sft
from safetrigger.config import RunConfig
from safetrigger.model_cache import resolve_model
cfg = RunConfig.model_validate(json.loads(Path(sys.argv[1]).read_text()))
if not os.environ.get("RAY_ADDRESS"):
    init_ray(cfg)
out, model = Path(sys.argv[3]), resolve_model(cfg.model.source)
if len(sys.argv) > 4:
    loop = {**sft_loop_config(sys.argv[2], model, cfg), "record": sys.argv[4]}
    result = fit(RECORDED_SFT, loop, cfg.sft, out, out.name, emit=print)
else:
    result = train_sft(sys.argv[2], model, out, cfg, name=out.name, emit=print)
print("TRAINED", result["metrics"]["step"])
""".replace("RECORDED_SFT", repr(RECORDED_SFT))


@dataclass(frozen=True)
class CleanRun:
    """`six_step_sft`'s run: its data, its adapter, every rank's reported checkpoints (one JSON line each) and Ray
    Train's directory of the run (checkpoints and the checkpoint manager's snapshot)."""
    data: Path
    adapter: Path
    reports: Path
    train_dir: Path


@pytest.fixture(scope="session")
def six_step_sft(tmp_path_factory, data_root) -> CleanRun:
    """The data of `six_step_sft_config` and the adapter a run of it without a fault trains: the reference a
    faulted run on the same seed must reach. Trained once per test process (a whole two-worker fit, 34 s on 2
    cores with the slow saves below, 23-25 s without); where its workers ran does not change the weights (the
    node-loss test matched its reference within 1e-5 with the workers on two nodes in one run and on one node in
    the other). Rank 0 takes 3 s longer to write each of its three checkpoints and every rank records the
    checkpoint it reports (tests/train_builders.py): what tests/test_train.py's checkpoint test reads, a fit of its
    own before (~30 s); neither changes a weight.

    On a local cluster started here when Ray is down (tests/test_train.py runs first for that). When this process
    is already a driver of another cluster, in a process of its own: a driver that started a local cluster before
    keeps that cluster's token auth, and a `ray start` cluster without auth calling back into it (the Train
    controller's arguments are the driver's objects) was refused and cancelled the controller (measured)."""
    import subprocess

    import ray

    from pipelines.runtime import init_ray
    from pipelines.train.ray_train import fit
    from pipelines.train.sft import sft_loop_config
    from safetrigger.method import render_safe_block
    from safetrigger.model_cache import resolve_model

    refusal = render_safe_block("The core question is unsafe.") + "\n\nI can't help with that."
    work = tmp_path_factory.mktemp("six-step-sft")
    cfg = six_step_sft_config(data_root)
    model_path = resolve_model(cfg.model.source)
    data = sft_examples(work / "sft.jsonl", model_path, answer=lambda i: refusal if i % 2 else f"It is {i}.")
    run = CleanRun(data, work / "clean", work / "reports.jsonl", work / "ray-train" / "clean")
    if ray.is_initialized():
        (work / "cfg.json").write_text(cfg.model_dump_json())
        out = subprocess.run([sys.executable, "-c", TRAIN_SFT, str(work / "cfg.json"), str(data), str(run.adapter),
                              str(run.reports)], cwd=REPO, capture_output=True, text=True, timeout=900,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert out.returncode == 0 and "TRAINED 6" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
        return run
    init_ray(cfg)
    try:
        clean = fit(RECORDED_SFT, {**sft_loop_config(data, model_path, cfg), "record": str(run.reports)}, cfg.sft,
                    run.adapter, "clean")
    finally:
        ray.shutdown()
    assert clean["metrics"]["step"] == 6 and Path(clean["adapter"]) == run.adapter.resolve()
    return run


def wait_for_a_registered_checkpoint(out_dir: Path, name: str, step: int, timeout_s: float = 600) -> bool:
    """Until rank 0 of Ray Train run `name` logged `step` and the controller registered a checkpoint: a fault
    before that restarts the group from scratch (measured: steps 1-3, then 1-6 again, no resume)."""
    import json
    import time

    steps = out_dir / f".{name}.progress"  # rank 0 appends a line per step at once (the driver's lines lag)
    registered = out_dir / "ray-train" / name / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [json.loads(x).get("step", 0) for x in steps.read_text().splitlines()] if steps.is_file() else []
        if max(done, default=0) >= step and registered.is_file():
            return True
        time.sleep(0.05)
    return False
