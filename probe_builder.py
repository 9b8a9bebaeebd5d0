import time, json, os
T = "/tmp/probe/fit_times.jsonl"
def mark(what):
    with open(T, "a") as f:
        f.write(json.dumps({"t": time.time(), "what": what, "pid": os.getpid()}) + "\n")
def sft(c):
    mark("builder start")
    import torch, transformers, peft, trl  # noqa
    mark("imports done")
    from pipelines.train.sft import build_sft_trainer
    tr = build_sft_trainer(c)
    mark("builder done")
    from transformers import TrainerCallback
    class E(TrainerCallback):
        def on_train_begin(self, *a, **k): mark("train begin")
        def on_step_end(self, a, state, *x, **k): mark(f"step {state.global_step}")
        def on_train_end(self, *a, **k): mark("train end")
    tr.add_callback(E())
    return tr
