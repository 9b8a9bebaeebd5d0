"""Python client for the Safe Trigger gateway: chat (with the `<safe>` verdict typed) and pipeline jobs.

    from clients.client import Client
    c = Client("http://127.0.0.1:8000/gw", api_key="st-…")
    r = c.chat("How do I kill a Python process?")      # r.content, r.safety.triggered, r.reasoning
    job = c.submit("configs/embedded.yaml")            # a RunConfig file or dict
    c.wait(job, on_progress=print); c.report(job)

Errors from the server arrive as `SafeTriggerError` with its status and message, never as HTTP internals.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import yaml

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SafeTriggerError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class Safety:
    triggered: bool = False
    complete: bool = False
    analysis: str = ""


@dataclass(frozen=True)
class ChatResult:
    content: str
    reasoning: str
    safety: Safety
    model: str
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatus:
    id: str
    status: str
    stage: str | None = None
    progress: str | None = None
    message: str | None = None
    report_ready: bool = False

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json().get("error") or {}
        message = err.get("message") or r.text
    except ValueError:
        message = r.text or r.reason_phrase
    retry = r.headers.get("retry-after")
    raise SafeTriggerError(r.status_code, message, float(retry) if retry else None)


def _messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _chat_body(prompt, model, max_tokens, safety, stream, extra) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": _messages(prompt), "stream": stream, **extra}
    for k, v in (("model", model), ("max_tokens", max_tokens), ("safety", safety)):
        if v is not None:
            body[k] = v
    return body


def _chat_result(data: dict[str, Any]) -> ChatResult:
    choice = data["choices"][0]
    msg = choice["message"]
    return ChatResult(msg.get("content") or "", msg.get("reasoning_content") or "", Safety(**(msg.get("safety") or {})),
                      data.get("model", ""), choice.get("finish_reason") or "", data.get("usage") or {})


def _config_dict(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    return yaml.safe_load(Path(config).read_text())


def _job_status(d: dict[str, Any]) -> JobStatus:
    return JobStatus(d["id"], d["status"], d.get("stage"), d.get("progress"), d.get("message"), bool(d.get("report_ready")))


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise SafeTriggerError(0, f"cannot reach the gateway at {self._http.base_url}: {type(e).__name__}") from None
        _raise_for(r)
        return r

    def chat(self, prompt: str | list[dict[str, Any]], model: str | None = None, max_tokens: int | None = None,
             safety: str | None = None, **extra: Any) -> ChatResult:
        return _chat_result(self._req("POST", "/v1/chat/completions", json=_chat_body(prompt, model, max_tokens, safety, False, extra)).json())

    def chat_stream(self, prompt: str | list[dict[str, Any]], model: str | None = None, max_tokens: int | None = None,
                    safety: str | None = None, **extra: Any) -> Iterator[dict[str, Any]]:
        """Yields each chunk's choice; the last one carries `finish_reason` and `safety`."""
        body = _chat_body(prompt, model, max_tokens, safety, True, extra)
        with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for line in r.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    if chunk.get("choices"):
                        yield chunk["choices"][0]

    def models(self) -> dict[str, Any]:
        return self._req("GET", "/v1/models").json()

    def submit(self, config: str | Path | dict[str, Any], name: str | None = None) -> str:
        return self._req("POST", "/v1/jobs", json={"config": _config_dict(config), "name": name}).json()["id"]

    def status(self, job_id: str) -> JobStatus:
        return _job_status(self._req("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self) -> list[JobStatus]:
        """This key's jobs, newest first."""
        return [_job_status(j) for j in self._req("GET", "/v1/jobs").json()["jobs"]]

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 2.0,
             on_progress: Callable[[JobStatus], None] | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            st = self.status(job_id)
            if on_progress and (st.stage, st.progress, st.status) != last:
                on_progress(st)
                last = (st.stage, st.progress, st.status)
            if st.done:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st.status} after {timeout}s (stage {st.stage})")
            time.sleep(poll_s)

    def progress(self, job_id: str, after: int = 0, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """The job's progress events (time, stage, message) after the first `after`, and the offset to poll from next."""
        d = self._req("GET", f"/v1/jobs/{job_id}/progress", params={"after": after, "limit": limit}).json()
        return d["events"], d["next"]

    def logs(self, job_id: str) -> str:
        return self._req("GET", f"/v1/jobs/{job_id}/logs").text

    def follow_logs(self, job_id: str) -> Iterator[str]:
        with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            yield from r.iter_text()

    def cancel(self, job_id: str) -> bool:
        return bool(self._req("DELETE", f"/v1/jobs/{job_id}").json()["stopped"])

    def report(self, job_id: str, format: str = "json") -> Any:
        r = self._req("GET", f"/v1/jobs/{job_id}/report", params={"format": format})
        return r.json() if format == "json" else r.text

    def promote(self, job_id: str, adapter: str, version: int | None = None) -> dict[str, Any]:
        """Operators (an `admin` key): serve a job's adapter as the promoted model, if the gateway's gate passes it
        on the job's report. Returns the promotion and the decision; a refusal raises with its reasons."""
        body: dict[str, Any] = {"job": job_id, "adapter": adapter, **({"version": version} if version else {})}
        return self._req("POST", "/v1/admin/promote", json=body).json()


class AsyncClient:
    """The same calls for asyncio code."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                       headers={"Authorization": f"Bearer {api_key}"})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise SafeTriggerError(0, f"cannot reach the gateway at {self._http.base_url}: {type(e).__name__}") from None
        _raise_for(r)
        return r

    async def chat(self, prompt: str | list[dict[str, Any]], model: str | None = None, max_tokens: int | None = None,
                   safety: str | None = None, **extra: Any) -> ChatResult:
        r = await self._req("POST", "/v1/chat/completions", json=_chat_body(prompt, model, max_tokens, safety, False, extra))
        return _chat_result(r.json())

    async def chat_stream(self, prompt: str | list[dict[str, Any]], model: str | None = None, max_tokens: int | None = None,
                          safety: str | None = None, **extra: Any) -> AsyncIterator[dict[str, Any]]:
        body = _chat_body(prompt, model, max_tokens, safety, True, extra)
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise_for(r)
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    if chunk.get("choices"):
                        yield chunk["choices"][0]

    async def submit(self, config: str | Path | dict[str, Any], name: str | None = None) -> str:
        return (await self._req("POST", "/v1/jobs", json={"config": _config_dict(config), "name": name})).json()["id"]

    async def status(self, job_id: str) -> JobStatus:
        return _job_status((await self._req("GET", f"/v1/jobs/{job_id}")).json())

    async def jobs(self) -> list[JobStatus]:
        return [_job_status(j) for j in (await self._req("GET", "/v1/jobs")).json()["jobs"]]

    async def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 2.0,
                   on_progress: Callable[[JobStatus], None] | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = await self.status(job_id)
            if on_progress:
                on_progress(st)
            if st.done:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st.status} after {timeout}s (stage {st.stage})")
            await asyncio.sleep(poll_s)

    async def cancel(self, job_id: str) -> bool:
        return bool((await self._req("DELETE", f"/v1/jobs/{job_id}")).json()["stopped"])

    async def report(self, job_id: str, format: str = "json") -> Any:
        r = await self._req("GET", f"/v1/jobs/{job_id}/report", params={"format": format})
        return r.json() if format == "json" else r.text
