"""Pure logic of the gateway: keys and limits, model routing, reasoning/`<safe>` shaping of streams, job configs."""

import asyncio
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safetrigger.config import REPO_ROOT
from services import adapters, registry
from services.gateway.auth import AuthError, KeyRing, hash_key
from services.gateway.config import GatewayConfig, KeyConfig, LimitsConfig
from services.gateway.inference import (
    RequestError,
    StreamShaper,
    ThinkSplitter,
    resolve_model,
    shape_message,
    shape_stream,
    shape_text_choice,
)
from safetrigger.artifacts import PROGRESS, last_progress
from services.gateway.routers.inference import check_generation, visibility
from services.gateway.jobs import confine
from tests.conftest import tiny_adapter


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


def test_a_request_the_policy_could_not_serve_gives_its_rate_token_back():
    key = _key(requests_per_minute=1, burst=1, max_concurrent=5)
    ring = KeyRing([key])
    ring.acquire(key, now=0.0)
    ring.refund(key)  # answered 503: the replica was restarting
    ring.release(key)
    ring.acquire(key, now=0.0)  # the same minute: the token is back
    ring.refund(key)
    ring.refund(key)  # never above the burst
    ring.acquire(key, now=0.0)
    with pytest.raises(AuthError, match="rate limit"):
        ring.acquire(key, now=0.0)


def test_model_routing_follows_the_promotion(tmp_path):
    assert resolve_model(None, "policy", str(tmp_path)) == "policy"
    v = adapters.publish(tmp_path, "st-d", tiny_adapter(tmp_path / "src"))
    registry.promote(tmp_path, "st-d", v, "policy")
    assert resolve_model("policy", "policy", str(tmp_path)) == "policy:st-d@v1"
    assert resolve_model("policy:base", "policy", str(tmp_path)) == "policy"
    assert resolve_model("policy:st-d", "policy", str(tmp_path)) == "policy:st-d"
    assert resolve_model("policy:st-d@v1", "policy", str(tmp_path)) == "policy:st-d@v1"
    for bad, status in (("gpt-4", 404), ("policy:st-s", 404), ("policy:st-d@v9", 404), ("policy:st-d@vx", 400),
                        ("policy:../../etc", 400), ("policy:st-d@v01", 400), ("policy:st-d@v\u0661", 400),
                        ("policy:st-d@v\u00b2", 400), ("policy:st-d@v" + "9" * 5000, 400), ("policy:st-d@v0", 400),
                        ("policy:st-\u0434", 400), ("policy:", 400)):
        with pytest.raises(RequestError) as e:
            resolve_model(bad, "policy", str(tmp_path))
        assert e.value.status == status, bad
        assert str(tmp_path) not in e.value.message  # no server paths in what a client reads
    with pytest.raises(RequestError):
        resolve_model("policy:st-d", "policy", None)


def test_message_shaping():
    msg = shape_message({"role": "assistant", "content": "<think>risky</think>\n<safe>unsafe ask</safe>\n\nI can't."}, False)
    assert msg["reasoning_content"] == "risky" and msg["content"] == "I can't."
    assert msg["safety"] == {"triggered": True, "complete": True}  # hidden: the verdict, never the analysis
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


def _payloads(pieces, chat=True, finish="stop"):
    out = []
    for i, piece in enumerate(pieces):
        last = finish if i == len(pieces) - 1 else None
        choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece, "logprobs": None}
        kind = "chat.completion.chunk" if chat else "text_completion"
        out.append(json.dumps({"id": "c1", "object": kind, "choices": [{**choice, "finish_reason": last}]}))
    return out


def _collect(pieces, show, chat=True, batch=1):
    """Upstream payloads in batches of `batch` through a StreamShaper: the decoded chunks, packets, shaper."""
    payloads = _payloads(pieces, chat)

    async def batches():
        for i in range(0, len(payloads), batch):
            yield payloads[i:i + batch]

    shaper = StreamShaper(chat, show)

    async def run():
        return [p async for p in shape_stream(batches(), shaper)]

    packets = asyncio.run(run())
    events = [e for p in packets for e in p.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[5:]) for e in events[:-1]], packets, shaper


def _text(chunks, chat=True):
    return "".join((c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]) for c in chunks)


def test_stream_hides_the_block_and_reports_it_last():
    deltas = ["<sa", "fe>The request", " is unsafe.</s", "afe>\n\nI can", "'t help."]
    chunks, _, shaper = _collect(deltas, show=False)
    assert _text(chunks) == "I can't help."
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["safety"] == {"triggered": True, "complete": True}
    assert "unsafe" not in "".join(json.dumps(c) for c in chunks)  # nothing of the hidden analysis, anywhere
    assert shaper.safety == {"triggered": True, "complete": True, "analysis": "The request is unsafe."}
    shown, _, _ = _collect(deltas, show=True)
    assert _text(shown) == "".join(deltas)
    assert shown[-1]["choices"][0]["safety"] == shaper.safety


def test_completions_stream_hides_the_block_and_keeps_whitespace():
    pieces = [" Paris", " is<sa", "fe>a capital", "</safe>", " the capital", "."]
    chunks, _, shaper = _collect(pieces, show=False, chat=False)
    full = "".join(pieces)
    assert _text(chunks, chat=False) == " Paris is the capital." == shape_text_choice({"text": full}, False)["text"]
    assert chunks[-1]["choices"][0]["safety"] == {"triggered": True, "complete": True}
    assert shape_text_choice({"text": full}, True)["safety"]["analysis"] == "a capital"
    assert chunks[-1]["object"] == "text_completion" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    shown, _, _ = _collect(pieces, show=True, chat=False)
    assert _text(shown, chat=False) == full == shape_text_choice({"text": full}, True)["text"]
    plain, _, _ = _collect([" 4", "2"], show=False, chat=False)
    assert _text(plain, chat=False) == " 42" and plain[-1]["choices"][0]["safety"]["triggered"] is False


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 50])
def test_one_packet_per_upstream_batch_same_text(chat, batch):
    """The server's stream batches survive the gateway: at most one packet per batch plus the last, and the
    text does not depend on how the stream was batched."""
    text = "<think>hmm</think>" * chat + "Sure.<safe>risky</safe> No. " * 3 + "Done."
    rng = random.Random(batch)
    cuts = sorted(rng.sample(range(1, len(text)), 25))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    chunks, packets, shaper = _collect(pieces, show=False, chat=chat, batch=batch)
    assert len(packets) <= -(-len(pieces) // batch) + 1
    one, _, _ = _collect(pieces, show=False, chat=chat, batch=1)
    whole = shape_message({"content": text}, False)["content"] if chat else shape_text_choice({"text": text}, False)["text"]
    assert _text(chunks, chat) == _text(one, chat) == whole == "Sure. No. Sure. No. Sure. No. Done."  # as if not streamed
    assert shaper.safety == {"triggered": True, "complete": True, "analysis": "risky"}


def test_job_configs_are_confined(tmp_path, data_root):
    gw = GatewayConfig(artifact_root=str(tmp_path / "jobs"), allowed_data_roots=[str(data_root)], adapter_root="/srv/adapters")
    base = {"output_dir": "run", "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]}}
    run = confine(base, gw, "st-0123456789ab")
    served = gw.model_copy(update={"policy_model_source": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"})
    assert confine(base, served, "st-0123456789ab").model.source == served.policy_model_source  # filled in
    with pytest.raises(RequestError, match="not the served policy"):
        confine({**base, "model": {"source": "Qwen/Qwen3-8B"}}, served, "st-0123456789ab")
    assert confine({**base, "model": {"source": served.policy_model_source}}, served, "st-0123456789ab")
    assert run.output_dir == str((tmp_path / "jobs" / "st-0123456789ab" / "run").resolve())
    assert run.serving.attach and run.serving.adapter_root == "/srv/adapters" and run.ray.address == "auto"
    assert run.serving.route_prefix is None  # jobs reach the policy by handle: it has no HTTP route
    assert run.serving.adapter_scope == "st-0123456789ab"  # its own registry: it never publishes into the served one
    with pytest.raises(RequestError, match="serving.adapter_scope"):  # nor into another job's
        confine({**base, "serving": {"adapter_scope": "st-ffffffffffff"}}, gw, "st-0123456789ab")
    nul = {**base, "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "a\x00b"}]}}
    with pytest.raises(RequestError, match=r"config.data.sources\[0\].path: a NUL character"):  # was a 500
        confine(nul, gw, "st-0123456789ab")
    deep: dict = {}
    for _ in range(5000):
        deep = {"x": deep}
    with pytest.raises(RequestError, match="nested too deeply"):
        confine({**base, "name": deep}, gw, "st-0123456789ab")
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


def test_a_jobs_progress_is_the_last_line_of_its_progress_file(tmp_path):
    """The run records each `[stage] message` line as JSON (pipelines/progress_log.py); the jobs API reads the
    newest whole one from the job's directory, never log text."""
    from pipelines.progress_log import recording, say
    from services.gateway.jobs import JobsService

    jobs = JobsService(GatewayConfig(artifact_root=str(tmp_path)))
    assert jobs.progress("st-0123456789ab") is None
    run_dir = tmp_path / "st-0123456789ab" / "run"
    run_dir.mkdir(parents=True)
    with recording(run_dir / PROGRESS):
        say("noise\n[generate] 8/24 rows (33%), 1.2 rows/s, ETA 13s\nINFO something")
        say("[judge] 24/24 rows (100%)")
    say("[review] not recorded: outside a run")
    event = jobs.progress("st-0123456789ab")
    assert (event["stage"], event["message"]) == ("judge", "24/24 rows (100%)") and event["time"] > 0
    with (run_dir / PROGRESS).open("a") as f:
        f.write('{"stage": "review", "mess')  # a line cut by a kill mid-write
    assert last_progress(run_dir / PROGRESS)["stage"] == "judge"


def test_progress_events_page_by_offset_and_pass_over_cut_lines(tmp_path):
    from safetrigger.artifacts import progress_events

    path = tmp_path / PROGRESS
    assert progress_events(path) == ([], 0)  # no run yet
    lines = [{"time": i, "stage": s, "message": str(i)} for i, s in enumerate(["generate", "generate", "judge"])]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]) + '{"stage": "gen\n' + json.dumps(lines[2]) + "\n"
                    + '{"stage": "review", "mess')  # a line cut by a kill, then one still being written
    assert progress_events(path) == (lines, 4)  # the cut line is counted, the unfinished one is not
    assert progress_events(path, limit=1) == (lines[:1], 1)
    assert progress_events(path, after=1, limit=1) == (lines[1:2], 2)
    assert progress_events(path, after=2) == (lines[2:], 4)
    assert progress_events(path, after=4) == ([], 4) and progress_events(path, after=9) == ([], 9)
    with path.open("a") as f:
        f.write('age": "1"}\n')  # the last line, finished: the next poll gets it
    assert progress_events(path, after=4) == ([{"stage": "review", "message": "1"}], 5)


def test_requests_are_counted_by_route_template_and_status(tmp_path, data_root):
    """The metrics middleware (pure ASGI) labels by the route template and the status that went out."""
    from fastapi.testclient import TestClient

    from services.gateway.app import build_app

    app = build_app(GatewayConfig(keys=[KeyConfig(id="k", sha256=hash_key("st-k"), scopes=["jobs"])],
                                  artifact_root=str(tmp_path / "jobs"), allowed_data_roots=[str(data_root)]))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/chat/completions", json={}).status_code == 401
        assert c.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer st-k"}).status_code == 403
        gone = c.get("/v1/jobs/st-000000000000", headers={"Authorization": "Bearer st-k"})  # no Ray job server here
        assert gone.status_code == 503 and gone.headers["retry-after"] == "5" and "job server" in gone.text
        config = {"output_dir": "run", "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]}}
        lost = c.post("/v1/jobs", json={"config": config}, headers={"Authorization": "Bearer st-k"})
        assert lost.status_code == 503 and not any((tmp_path / "jobs").glob("*"))  # no half-made job left
        assert c.get("/nowhere").status_code == 404
        text = c.get("/metrics").text
    for route, status in (("/healthz", 200), ("/v1/chat/completions", 401), ("/v1/chat/completions", 403),
                          ("/v1/jobs/{job_id}", 503), ("/v1/jobs", 503), ("unmatched", 404)):
        assert f'safe_trigger_gateway_requests_total{{route="{route}",status="{status}"}} 1.0' in text, (route, status)


def test_promotion_is_an_admin_action_with_a_checked_body(tmp_path):
    from fastapi.testclient import TestClient

    from services.gateway.app import build_app

    keys = [KeyConfig(id="t", sha256=hash_key("st-t"), scopes=["inference", "jobs"]),
            KeyConfig(id="ops", sha256=hash_key("st-ops"), scopes=["admin"])]
    app = build_app(GatewayConfig(keys=keys, artifact_root=str(tmp_path / "jobs"), adapter_root=str(tmp_path / "adapters")))
    ok = {"job": "st-0123456789ab", "adapter": "st-d"}
    with TestClient(app) as c:
        def promote(body, key="st-ops"):
            return c.post("/v1/admin/promote", json=body, headers={"Authorization": f"Bearer {key}"})

        assert promote(ok, "st-t").status_code == 403  # a tenant's key, jobs scope included, cannot promote
        for bad, word in (({**ok, "job": "../../etc"}, "job must be"), ({**ok, "adapter": "st-d/../x"}, "adapter must be"),
                          ({**ok, "adapter": "ｓｔ-d"}, "adapter must be"),
                          ({**ok, "adapter": "st-d\n"}, "adapter must be"), ({**ok, "adapter": "jobs"}, "adapter must be"), ({**ok, "version": "1"}, "version must be"),
                          ({**ok, "version": True}, "version must be"), ({**ok, "version": 10**12}, "version must be"),
                          ({**ok, "model": "x"}, "unknown field"), ({"adapter": "st-d"}, "job must be")):
            r = promote(bad)
            assert r.status_code == 400 and word in r.json()["error"]["message"], (bad, r.text)
        r = promote(ok)  # no such job's adapter: nothing to promote, and no server path in the answer
        assert r.status_code == 404 and str(tmp_path) not in r.text
        assert not (tmp_path / "adapters" / registry.PROMOTED).exists()


def test_http_upstream_batches_whole_events_and_reports_a_broken_stream():
    """Network reads cut events anywhere: a batch holds only whole events, one batch per read that completes
    any; a connection lost mid-stream is an UpstreamError (the gateway turns it into an error event)."""
    import httpx

    from services.gateway.upstream import HttpUpstream, UpstreamError

    events = "".join(f'data: {{"n": {i}}}\n\n' for i in range(5)) + "data: [DONE]\n\n"
    reads = [events[:7], events[7:30], events[30:31], events[31:]]

    class Body(httpx.AsyncByteStream):
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def __aiter__(self):
            for piece in reads[: 2 if self.fail else None]:
                yield piece.encode()
            if self.fail:
                raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions" and json.loads(request.content)["model"] == "policy"
        return httpx.Response(200, stream=Body(fail=request.headers.get("x-fail") == "1"))

    async def run(fail: bool):
        up = HttpUpstream("http://policy/v1", 10, transport=httpx.MockTransport(handler))
        up._client.headers["x-fail"] = "1" if fail else "0"
        got = []
        try:
            async for batch in await up.stream("completions", "policy", {"model": "policy", "prompt": "x"}):
                got.append(batch)
        finally:
            await up.aclose()
        return got

    batches = asyncio.run(run(False))
    assert [json.loads(d)["n"] for b in batches for d in b] == [0, 1, 2, 3, 4]
    assert all(batches) and len(batches) <= len(reads)
    with pytest.raises(UpstreamError) as e:
        asyncio.run(run(True))
    assert e.value.status == 503 and "broke off" in e.value.message


@pytest.mark.parametrize("message", [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/a.png"}}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Blue."}],
     "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "1"},
    {"role": "developer", "content": [{"type": "text", "text": "x"}]},
])
def test_a_validated_chat_request_pickles_for_the_handle_call(message):
    """The gateway sends the validated request through a Ray handle (pickled). pydantic#9467 (ray#60291): fields
    typed `Iterable[...]` were kept as ValidatorIterators that do not pickle, and Ray's ingress works around it
    with a private sanitiser. On the pinned pydantic and vLLM they validate to lists; if this fails after an
    upgrade, the gateway needs that sanitiser (materialise message content and tool_calls as lists) again."""
    import pickle

    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate({"model": "policy", "messages": [message]})
    back = pickle.loads(pickle.dumps(request)).messages[0]
    assert isinstance(back["content"], list) and back["content"] == message["content"]
    assert back.get("tool_calls", []) == message.get("tool_calls", [])


def test_listing_jobs_shows_only_the_keys_own_newest_first(tmp_path):
    from types import SimpleNamespace

    from services.gateway.jobs import JobsService

    def job(sid, key, start, status="SUCCEEDED"):
        return SimpleNamespace(submission_id=sid, metadata={"key": key, "name": (sid or "")[-2:]}, start_time=start,
                               end_time=None, status=status)

    jobs = JobsService(GatewayConfig(artifact_root=str(tmp_path)))
    jobs._client = SimpleNamespace(list_jobs=lambda: [
        job("st-00000000000a", "mine", 1), job("st-00000000000b", "theirs", 2), job("st-00000000000c", "mine", 3),
        job("raysubmit_x", "mine", 4), job(None, "mine", 5)])
    listed = asyncio.run(jobs.list_own("mine"))["jobs"]
    assert [j["id"] for j in listed] == ["st-00000000000c", "st-00000000000a"]
    assert listed[0] == {"id": "st-00000000000c", "name": "0c", "status": "SUCCEEDED", "start_time": 3, "end_time": None}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs"])
@pytest.mark.parametrize("body, word", [(b'{"a": "\xc3\x28"}', "UTF-8"), (b"[" * 100_000 + b"]" * 100_000, "nested"),
                                        (b'{"a": ', "not valid JSON")])
def test_undecodable_bodies_are_a_400_naming_the_fault(tmp_path, path, body, word):
    """Invalid UTF-8 and JSON nested past the parser's recursion limit were 500s on both body-reading routes."""
    from fastapi.testclient import TestClient

    from services.gateway.app import build_app

    app = build_app(GatewayConfig(keys=[KeyConfig(id="k", sha256=hash_key("st-k"), scopes=["inference", "jobs"])],
                                  artifact_root=str(tmp_path / "jobs")))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post(path, content=body, headers={"Authorization": "Bearer st-k", "content-type": "application/json"})
    assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())  # nothing half-made


def _stream_message(pieces, opened, show=False, server_reasoning=""):
    """Chat deltas through a StreamShaper: the (reasoning_content, content) a client puts together."""
    payloads = []
    if server_reasoning:
        payloads.append(json.dumps({"object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": {"reasoning_content": server_reasoning}}]}))
    payloads += _payloads(pieces)
    shaper = StreamShaper(True, show, think_opened=opened)
    events = "".join(shaper.feed(p) for p in payloads) + shaper.finish()
    chunks = [json.loads(e[5:]) for e in events.split("\n\n") if e and e != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    return "".join(d.get("reasoning_content", "") for d in deltas), "".join(d.get("content", "") for d in deltas)


_THINK = st.sampled_from(["", "Okay, the user asks. ", "step <b>one</b>\n\nstep two. ", "<safe>odd</safe> hm "])
_ANSWER = st.sampled_from(["", "Sure.", "\n\nI can't help.", "<safe>risky ask</safe>\n\nNo.", "A <thin", "x</safe>y"])


@settings(max_examples=300, deadline=None)
@given(opened=st.booleans(), think=_THINK, answer=_ANSWER, form=st.sampled_from(["closed", "cut", "none"]),
       show=st.booleans(), cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=8))
def test_streaming_agrees_with_non_streaming_for_both_think_conventions(opened, think, answer, form, show, cuts):
    """Templates that open `<think>` (R1) and models that write it (Qwen3): what a client assembles from the
    stream is what the non-streamed message says, whatever the cut points, the think block closed, cut off or
    absent."""
    head = "" if opened else "<think>"
    content = {"closed": f"{head}{think}</think>{answer}", "cut": f"{head}{think}", "none": answer}[form]
    if not opened and form == "none":
        content = answer
    points = sorted({c for c in cuts if c < len(content)})
    pieces = [content[a:b] for a, b in zip([0, *points], [*points, len(content)])] or [""]
    reasoning, streamed = _stream_message(pieces, opened, show)
    whole = shape_message({"role": "assistant", "content": content}, show, think_opened=opened)
    assert reasoning.strip() == (whole.get("reasoning_content") or "").strip()
    assert streamed.strip() == whole["content"].strip()
    text_chunks, _, _ = _collect(pieces, show=show, chat=False)  # completions: raw text, only `<safe>` handled
    assert _text(text_chunks, chat=False) == shape_text_choice({"text": content}, show)["text"]


def test_prefilled_template_stream_splits_reasoning_from_the_first_token():
    reasoning, content = _stream_message(["Okay, lock", "picking is", " illegal here.</th", "ink>\n\nI can't help."], True)
    assert (reasoning, content.strip()) == ("Okay, lockpicking is illegal here.", "I can't help.")
    cut, answer = _stream_message(["Okay, the user", " wants"], True)  # max_tokens hit inside the reasoning
    assert (cut, answer) == ("Okay, the user wants", "")
    whole = shape_message({"content": "Okay, the user wants"}, False, think_opened=True)
    assert (whole["reasoning_content"], whole["content"]) == ("Okay, the user wants", "")


def test_a_server_side_reasoning_parser_is_not_split_again():
    reasoning, content = _stream_message(["Sure", ", here it is."], True, server_reasoning="they ask for X")
    assert (reasoning, content) == ("they ask for X", "Sure, here it is.")
    whole = shape_message({"content": "Sure, here it is.", "reasoning_content": "they ask for X"}, False, think_opened=True)
    assert (whole["reasoning_content"], whole["content"]) == ("they ask for X", "Sure, here it is.")


def _chat(**over):
    return {"model": "policy", "messages": [{"role": "user", "content": "Hi"}], **over}


@pytest.mark.parametrize("field, value", [
    ("echo", True), ("logprobs", True), ("top_logprobs", 5), ("prompt_logprobs", 1), ("best_of", 2),
    ("logit_bias", {"1": 100}), ("chat_template", "{{ messages }}"), ("tools", []), ("continue_final_message", True),
    ("add_generation_prompt", False), ("guided_json", {}), ("extra_body", {}),
])
def test_engine_fields_outside_the_allowlist_are_refused_by_name(field, value):
    """Fields the shaping and the replica's LoRA path are not proven on never reach the engine (a prompt-logprobs
    request crashed it for every tenant)."""
    with pytest.raises(RequestError) as e:
        check_generation(_chat(**{field: value}), True, _key(), LimitsConfig())
    assert e.value.status == 400 and repr(field) in e.value.message


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2, 3], [[1, 2]], "", None, {"text": "a"}])
def test_completions_take_one_string_prompt(prompt):
    """A list prompt gave one request several interleaved choices and one stream shaper over all of them."""
    body = {"model": "policy", "prompt": prompt} if prompt is not None else {"model": "policy"}
    with pytest.raises(RequestError) as e:
        check_generation(body, False, _key(), LimitsConfig())
    assert e.value.status == 400 and "prompt must be a non-empty string" in e.value.message


@pytest.mark.parametrize("over, word", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": True}, "top_p"),
    ({"n": 2}, "n must be 1"), ({"n": True}, "n must be 1"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": ""}, "stop"), ({"stop": ["x" * 65]}, "stop"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options"), ({"user": "u" * 300}, "user"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 65}, "exceeds the limit of 64"), ({"model": 3}, "model"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "'tool_calls'"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "exceeds the limit of 100"),
    ({"safety": "raw"}, "safety must be"),
])
def test_allowed_fields_are_bounded(over, word):
    with pytest.raises(RequestError) as e:
        check_generation(_chat(**over), True, _key(), LimitsConfig(max_tokens=64, max_prompt_chars=100))
    assert e.value.status == 400 and word in e.value.message


def test_an_ordinary_request_passes_and_gets_the_default_max_tokens():
    body = _chat(temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3, stream=True, stream_options={"include_usage": True},
                 user="app-7", n=1, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    check_generation(body, True, _key(), LimitsConfig(max_tokens=64))
    assert body["max_tokens"] == 64
    check_generation({"prompt": "The capital of France is"}, False, _key(), LimitsConfig())


def test_a_key_uses_only_the_engine_fields_it_was_granted():
    prefill = _chat(echo=True, add_generation_prompt=False, continue_final_message=True)
    check_generation(dict(prefill), True, _key(engine_fields=["echo", "add_generation_prompt", "continue_final_message"]),
                     LimitsConfig())
    with pytest.raises(RequestError, match="'continue_final_message'"):
        check_generation(dict(prefill), True, _key(engine_fields=["echo", "add_generation_prompt"]), LimitsConfig())
    with pytest.raises(ValueError):
        _key(engine_fields=["prompt_logprobs"])  # only fields off the logits path can be granted


def test_safety_visible_is_bounded_by_the_key():
    """Any key could ask for the `<safe>` analysis; now only a key with show_safety sees it."""
    with pytest.raises(RequestError) as e:
        visibility({"safety": "visible"}, _key())
    assert e.value.status == 403 and "show_safety" in e.value.message
    assert visibility({}, _key()) is False and visibility({"safety": "hidden"}, _key()) is False
    peek = _key(show_safety=True)
    assert visibility({}, peek) is True and visibility({"safety": "visible"}, peek) is True
    assert visibility({"safety": "hidden"}, peek) is False


JUDGE = {"app_name": "guard", "model_id": "meta-llama/Llama-Guard-3-8B", "tokenizer": "/models/guard"}


def _job(data_root, **over):
    return {"output_dir": "run", "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]},
            **over}


@pytest.mark.parametrize("over, word", [
    ({"sft": {"num_workers": 100000}}, "sft.num_workers 100000 exceeds"),
    ({"dpo": {"num_workers": 9}}, "dpo.num_workers 9 exceeds"),
    ({"eval": {"bootstrap_samples": 1_000_000_000}}, "eval.bootstrap_samples"),
    ({"sft": {"epochs": 1000}}, "sft.epochs"),
    ({"generation": {"max_tokens": 100_000}}, "generation.max_tokens"),
    ({"dpo": {"num_samples": 64}}, "dpo.num_samples"),
    ({"eval": {"judges": [{"name": "refusal", "type": "refusal"},
                          {"name": "g", "type": "deployment", "format": "llama_guard", **JUDGE, "app_name": "policy"}]}},
     "eval.judges[1]: deployment judge"),
    ({"eval": {"judges": [{"name": "refusal", "type": "refusal"},
                          {"name": "g", "type": "deployment", "format": "llama_guard", **JUDGE, "tokenizer": "/etc"}]}},
     "not one the operator allows"),
    ({"dpo": {"judge": {"type": "deployment", **JUDGE, "app_name": "gateway"}}}, "dpo.judge"),
    ({"review": {"candidates": 8}}, "review.candidates 8 exceeds"),
    ({"dpo": {"rounds": 3}}, "dpo.rounds 3 exceeds"),
    ({"eval": {"block_room_tokens": 5000}}, "eval.block_room_tokens 5000 exceeds"),
    ({"guards": [{"name": "mine", "model": {"source": "Qwen/Qwen3-8B"}}]}, "guards: deploying a judge model is the operator's"),
    ({"review": {"candidates": 2, "select_judges": [{"name": "g", "type": "deployment", **JUDGE, "model_id": "x"}]}},
     "review.select_judges[0]: deployment judge"),
])
def test_job_configs_stay_within_the_operators_policy(tmp_path, data_root, over, word):
    """Compute knobs are bounded and judges name only allowed deployments: any Serve app, tokenizer path or URL
    (reached from inside the cluster, with the answer in the job's logs) was accepted."""
    gw = GatewayConfig(artifact_root=str(tmp_path), allowed_data_roots=[str(data_root)], jobs={"judges": [JUDGE]})
    with pytest.raises(RequestError) as e:
        confine(_job(data_root, **over), gw, "st-0123456789ab")
    assert e.value.status == 422 and word in e.value.message, e.value.message
    allowed = {"eval": {"judges": [{"name": "refusal", "type": "refusal"},
                                   {"name": "g", "type": "deployment", "format": "llama_guard", **JUDGE}]}}
    assert confine(_job(data_root, **allowed), gw, "st-0123456789ab").eval.judges[1].app_name == "guard"


def test_hub_datasets_and_repo_paths_are_allowlisted(tmp_path, data_root):
    hf = {"type": "hf", "path": "walledai/HarmBench", "hf_kind": "harmful"}
    gw = GatewayConfig(artifact_root=str(tmp_path), allowed_data_roots=[str(data_root)])
    with pytest.raises(RequestError, match="a hub dataset must be one the operator allows"):
        confine(_job(data_root, data={"root": str(data_root), "sources": [hf]}), gw, "st-0123456789ab")
    allowing = gw.model_copy(update={"jobs": gw.jobs.model_copy(update={"hf_datasets": ["walledai/HarmBench"]})})
    assert confine(_job(data_root, data={"root": str(data_root), "sources": [hf]}), allowing, "st-0123456789ab")
    code = {"type": "queries", "path": "repo:services/gateway/config.py"}  # the checkout, not its data
    with pytest.raises(RequestError, match="outside the checkout's data/ folder"):
        confine(_job(data_root, data={"root": str(data_root), "sources": [code]}), gw, "st-0123456789ab")


def test_a_key_runs_at_most_its_quota_of_jobs_at_once(tmp_path, data_root):
    from types import SimpleNamespace

    from services.gateway.jobs import JobsService

    submitted = []
    running = [SimpleNamespace(submission_id=f"st-00000000000{i}", metadata={"key": "k"}, start_time=i, end_time=None,
                               status="RUNNING") for i in range(2)]
    jobs = JobsService(GatewayConfig(artifact_root=str(tmp_path), allowed_data_roots=[str(data_root)],
                                     jobs={"max_active_per_key": 2}))
    jobs._client = SimpleNamespace(list_jobs=lambda: running, submit_job=lambda **kw: submitted.append(kw))
    with pytest.raises(RequestError) as e:
        asyncio.run(jobs.submit("k", {"config": _job(data_root)}))
    assert e.value.status == 429 and "limit is 2" in e.value.message and not submitted
    assert not any(tmp_path.iterdir())  # nothing half-made
    running[0].status = "SUCCEEDED"
    out = asyncio.run(jobs.submit("k", {"config": _job(data_root)}))
    assert len(submitted) == 1 and out == {"id": submitted[0]["submission_id"], "status": "PENDING"}
    assert str(tmp_path) not in json.dumps(out)  # no server paths in what a tenant reads


def test_engine_fields_that_echo_the_prompt_never_reach_a_client():
    """A hidden response carried the prefilled `<safe>` block token by token in vLLM's `prompt_logprobs`."""
    from services.gateway.inference import public_fields

    leak = [{"12": {"decoded_token": " weapon"}}]
    out = public_fields({"id": "c", "choices": [{"index": 0, "message": {"content": "ok"}, "token_ids": [1],
                                                 "prompt_logprobs": leak}],
                         "prompt_logprobs": leak, "prompt_token_ids": [1], "prompt_text": "<safe>weapon", "usage": {}})
    assert "weapon" not in json.dumps(out) and out["choices"][0]["message"] == {"content": "ok"} and "usage" in out
    shaper = StreamShaper(True, False)
    sent = shaper.feed(json.dumps({"object": "chat.completion.chunk", "prompt_logprobs": leak,
                                   "choices": [{"index": 0, "delta": {"content": "Hi"}}]}))
    sent += shaper.feed(json.dumps({"object": "chat.completion.chunk", "prompt_text": "<safe>weapon", "choices": []}))
    assert "weapon" not in sent + shaper.finish()


def test_a_jobs_tracking_goes_to_the_operators_store_tagged_with_its_key(tmp_path, data_root):
    """A tenant's tracking URI would be a write anywhere (`sqlite:////etc/...`) or a send anywhere: refused; the
    job logs to the operator's store (or one store beside all jobs) with its key and job id, whatever it says."""
    gw = GatewayConfig(artifact_root=str(tmp_path), allowed_data_roots=[str(data_root)])
    with pytest.raises(RequestError, match="tracking.uri: jobs log to the operator's tracking store"):
        confine(_job(data_root, tracking={"uri": "sqlite:////etc/evil.db"}), gw, "st-0123456789ab", "k1")
    run = confine(_job(data_root, tracking={"key": "someone-else", "tags": {"team": "red"}}), gw, "st-0123456789ab", "k1")
    assert run.tracking.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (run.tracking.key, run.tracking.job, run.tracking.tags) == ("k1", "st-0123456789ab", {"team": "red"})
    server = gw.model_copy(update={"jobs": gw.jobs.model_copy(update={"tracking_uri": "http://mlflow:5000"})})
    assert confine(_job(data_root), server, "st-0123456789ab", "k1").tracking.uri == "http://mlflow:5000"
    with pytest.raises(RequestError, match="reserved"):
        confine(_job(data_root, tracking={"tags": {"mlflow.parentRunId": "x"}}), gw, "st-0123456789ab", "k1")


def test_a_fresh_gateways_concurrent_requests_all_wait_for_the_first_status_read(monkeypatch):
    """Found by bench/gateway.py's two warm-up clients: while a fresh gateway's first `serve.status()` read was out,
    every other request saw no replicas yet and got 503 "no running replica ()"."""
    import time
    from types import SimpleNamespace

    from ray import serve

    from services.gateway.upstream import HandleUpstream, UpstreamError

    reads = []

    def slow_status():  # Serve's status with one RUNNING replica, after a read that takes a while
        reads.append(1)
        time.sleep(0.2)
        dep = SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 1})
        return SimpleNamespace(applications={"policy": SimpleNamespace(
            status="RUNNING", message="", deployments={"PolicyServer:policy": dep})})

    monkeypatch.setattr(serve, "status", slow_status)
    up = HandleUpstream("policy", "PolicyServer:policy")

    async def burst():
        cancelled = asyncio.ensure_future(up._check_running())
        await asyncio.sleep(0.05)
        cancelled.cancel()  # a client gone while the read is out: the read itself goes on for the others
        return await asyncio.gather(*[up._check_running() for _ in range(3)], return_exceptions=True)

    results = asyncio.run(burst())
    assert results == [None, None, None] and len(reads) == 1
    assert up._running == 1

    def no_replica():
        return SimpleNamespace(applications={})

    monkeypatch.setattr(serve, "status", no_replica)
    up._status_at = float("-inf")  # the next request reads again
    with pytest.raises(UpstreamError) as e:
        asyncio.run(up._check_running())
    assert e.value.status == 503 and "not deployed" in str(e.value)


def test_a_request_waiting_for_a_replica_is_given_up_when_none_runs():
    """Serve's router holds a request whose replica died until a new one is up; the gateway looks at the replicas
    while it waits for the first item and answers 503 once none runs (the live case: tests/test_gateway.py)."""
    from services.gateway.upstream import HandleUpstream, UpstreamError

    class Response:  # a deployment response's async iteration, first item after `delay`
        def __init__(self, items, delay):
            self.items, self.delay = items, delay

        async def _gen(self):
            await asyncio.sleep(self.delay)
            for i in self.items:
                yield i

        def __aiter__(self):
            return self._gen()

    up = HandleUpstream("policy", "PolicyServer:policy")
    up.STATUS_TTL_S = 0.02
    looked = []

    async def running():
        looked.append(1)

    async def none_running():
        raise UpstreamError(503, "the policy has no running replica", 10)

    async def collect(response):
        return [x async for x in up._assigned(response)]

    up._check_running = running
    assert asyncio.run(collect(Response([1, 2, 3], 0.2))) == [1, 2, 3] and looked  # a slow first item is waited for
    assert asyncio.run(collect(Response([], 0.0))) == []
    up._check_running = none_running
    with pytest.raises(UpstreamError) as e:
        asyncio.run(collect(Response([1], 5.0)))
    assert e.value.status == 503 and e.value.retry_after == 10
