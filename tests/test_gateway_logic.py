"""Pure logic of the gateway: keys and limits, model routing, reasoning/`<safe>` shaping of streams, job configs."""

import asyncio
import json
import random

import pytest

from safetrigger.config import REPO_ROOT
from services import adapters, registry
from services.gateway.auth import AuthError, KeyRing, hash_key
from services.gateway.config import GatewayConfig, KeyConfig
from services.gateway.inference import RequestError, ThinkSplitter, resolve_model, shape_message, shape_stream
from services.gateway.jobs import confine, progress_of


def _key(**over):
    return KeyConfig(**{"id": "k", "sha256": hash_key("secret"), "scopes": ["inference"], **over})


def test_keys_are_checked_by_hash_and_scope():
    ring = KeyRing([_key(), _key(id="j", sha256=hash_key("jobs-secret"), scopes=["jobs"])])
    assert ring.authenticate("Bearer secret", "inference").id == "k"
    assert ring.authenticate("bearer jobs-secret", "jobs").id == "j"
    for header, scope, status in ((None, "inference", 401), ("Basic secret", "inference", 401),
                                  ("Bearer wrong", "inference", 401), ("Bearer secret", "jobs", 403)):
        with pytest.raises(AuthError) as e:
            ring.authenticate(header, scope)
        assert e.value.status == status
    assert "secret" not in repr(ring.keys[0].model_dump())  # only the hash is held


def test_token_bucket_and_concurrency():
    key = _key(requests_per_minute=60, burst=2, max_concurrent=5)
    ring = KeyRing([key])
    ring.acquire(key, now=0.0)
    ring.acquire(key, now=0.0)
    with pytest.raises(AuthError) as e:
        ring.acquire(key, now=0.1)
    assert e.value.status == 429 and e.value.retry_after == 1  # one token per second
    ring.acquire(key, now=1.2)  # refilled
    tight = _key(id="t", max_concurrent=1, burst=10)
    ring2 = KeyRing([tight])
    ring2.acquire(tight, now=0)
    with pytest.raises(AuthError, match="concurrent"):
        ring2.acquire(tight, now=0)
    ring2.release(tight)
    ring2.acquire(tight, now=0)


def test_model_routing_follows_the_promotion(tmp_path):
    assert resolve_model(None, "policy", str(tmp_path)) == "policy"
    src = tmp_path / "src"
    src.mkdir()
    for f in adapters.ADAPTER_FILES:
        (src / f).write_text("x")
    v = adapters.publish(tmp_path, "st-d", src)
    registry.promote(tmp_path, "st-d", v, "policy")
    assert resolve_model("policy", "policy", str(tmp_path)) == "policy:st-d@v1"
    assert resolve_model("policy:base", "policy", str(tmp_path)) == "policy"
    assert resolve_model("policy:st-s", "policy", str(tmp_path)) == "policy:st-s"
    with pytest.raises(RequestError) as e:
        resolve_model("gpt-4", "policy", str(tmp_path))
    assert e.value.status == 404


def test_message_shaping():
    msg = shape_message({"role": "assistant", "content": "<think>risky</think>\n<safe>unsafe ask</safe>\n\nI can't."}, False)
    assert msg["reasoning_content"] == "risky" and msg["content"] == "I can't."
    assert msg["safety"] == {"triggered": True, "complete": True, "analysis": "unsafe ask"}
    shown = shape_message({"role": "assistant", "content": "<safe>x</safe> ok"}, True)
    assert shown["content"] == "<safe>x</safe> ok" and shown["safety"]["analysis"] == "x"


@pytest.mark.parametrize("seed", range(20))
def test_think_splitter_any_chunking(seed):
    text = "<think>step one, step two</think>\n<safe>a</safe> The answer."
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    s, reasoning, answer = ThinkSplitter(), "", ""
    for p in pieces:
        r, a = s.feed(p)
        reasoning, answer = reasoning + r, answer + a
    r, a = s.close()
    assert (reasoning + r, answer + a) == ("step one, step two", "\n<safe>a</safe> The answer.")


def _sse(deltas, finish="stop"):
    async def gen():
        for i, d in enumerate(deltas):
            choice = {"index": 0, "delta": {"content": d}, "finish_reason": finish if i == len(deltas) - 1 else None}
            yield "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})
            yield ""
        yield "data: [DONE]"
    return gen()


def _collect(deltas, show):
    seen = []

    async def run():
        return [e async for e in shape_stream(_sse(deltas), show, seen.append)]

    events = asyncio.run(run())
    chunks = [json.loads(e[5:]) for e in events if e.startswith("data:") and "[DONE]" not in e]
    return chunks, seen, events[-1]


def test_stream_hides_the_block_and_reports_it_last():
    deltas = ["<sa", "fe>The request", " is unsafe.</s", "afe>\n\nI can", "'t help."]
    chunks, seen, done = _collect(deltas, show=False)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "I can't help." and done == "data: [DONE]\n\n"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["safety"] == {"triggered": True, "complete": True, "analysis": "The request is unsafe."}
    assert seen == [chunks[-1]["choices"][0]["safety"]]
    shown, _, _ = _collect(deltas, show=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in shown) == "".join(deltas)


def test_job_configs_are_confined(tmp_path, data_root):
    gw = GatewayConfig(artifact_root=str(tmp_path / "jobs"), allowed_data_roots=[str(data_root)], adapter_root="/srv/adapters")
    base = {"output_dir": "run", "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]}}
    run = confine(base, gw, "st-0123456789ab")
    assert run.output_dir == str((tmp_path / "jobs" / "st-0123456789ab" / "run").resolve())
    assert run.serving.attach and run.serving.adapter_root == "/srv/adapters" and run.ray.address == "auto"
    assert (run.serving.http_host, run.serving.http_port, run.serving.route_prefix) == ("127.0.0.1", 8000, "/")
    ok_repo = {**base, "data": {"root": str(data_root), "sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]}}
    assert confine(ok_repo, gw, "st-0123456789ab").data.sources[0].path.startswith("repo:")
    link = data_root.parent / "escape-link"  # never created: a symlink would be resolved by realpath anyway
    for bad, word in (({**base, "output_dir": "../x"}, "output_dir"), ({**base, "output_dir": "/abs"}, "output_dir"),
                      ({**base, "data": {"root": "/", "sources": [{"type": "advbench", "path": "etc/passwd"}]}}, "data.root"),
                      ({**base, "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "../../etc/passwd"}]}}, "'..'"),
                      ({**base, "data": {"root": str(data_root), "sources": [{"type": "queries", "path": "repo:../secrets"}]}}, "'..'"),
                      ({**base, "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": str(link)}]}}, "outside"),
                      ({**base, "model": {"source": "/root/model"}}, "model.source"),
                      ({**base, "nonsense": 1}, "invalid config"), ([], "JSON object")):
        with pytest.raises(RequestError) as e:
            confine(bad, gw, "st-0123456789ab")
        assert e.value.status == 422 and word in e.value.message, (bad, e.value.message)
    assert REPO_ROOT.is_dir()


def test_progress_is_the_last_stage_line():
    logs = "noise\n[generate] 8/24 rows (33%), 1.2 rows/s, ETA 13s\nINFO something\n[judge] 24/24 rows (100%)\n"
    assert progress_of(logs) == ("judge", "24/24 rows (100%)")
    assert progress_of("nothing here") == (None, None)
