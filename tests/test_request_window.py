"""The driver's request window (`serve_batch._by_handle`) as pure logic: a stand-in deployment handle whose answers
the test releases one by one. The real handle path runs in every stack test's stages."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines import serve_batch


class _Response:
    def __init__(self, qid: str, released: threading.Event) -> None:
        self.qid, self.released, self.cancelled = qid, released, False

    def __iter__(self):
        while not self.released.wait(0.01):
            if self.cancelled:
                raise RuntimeError("cancelled")
        yield {"text": f"answer to {self.qid}", "usage": {"prompt_tokens": 10 + int(self.qid[1:])}}

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """`handle.completions.remote(request)` -> a response answered when the test sets its query's event."""

    def __init__(self) -> None:
        self.release: dict[str, threading.Event] = {}
        self.sent: list[str] = []
        self.responses: dict[str, _Response] = {}
        self.lock = threading.Lock()

    def options(self, **_):
        return self

    @property
    def completions(self):
        return self

    def remote(self, request):
        qid = request["qid"]
        with self.lock:
            self.sent.append(qid)
            self.release.setdefault(qid, threading.Event())
            self.responses[qid] = _Response(qid, self.release[qid])
        return self.responses[qid]


@pytest.fixture
def handle(monkeypatch):
    h = _Handle()
    import ray.serve

    monkeypatch.setattr(ray.serve, "get_deployment_handle", lambda *a, **k: h)
    return h


def _rows(n: int) -> list[dict]:
    return [{"query_id": f"q{i}"} for i in range(n)]


def _pre(row):
    return {"query_id": row["query_id"], "method": "completions", "request_kwargs": {"qid": row["query_id"]}}


def _post(row):
    return {"query_id": row["query_id"], "text": row["text"]}


def _wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _window(rows, in_flight):
    return serve_batch._by_handle(rows, _endpoint(), _pre, _post, in_flight=in_flight)


def _endpoint():
    class Endpoint:
        deployment_name, app_name = "d", "a"
    return Endpoint()


def test_a_slow_oldest_request_does_not_hold_back_the_next_ones(handle):
    """With 2 in flight and the first answer slow, answers to later rows send the rows after them: the window
    refills on any answer, not only on the oldest's; rows still come back in their order."""
    rows = _rows(5)
    results = []
    reader = threading.Thread(target=lambda: results.extend(_window(rows, in_flight=2)))
    reader.start()
    _wait_until(lambda: handle.sent[:2] == ["q0", "q1"])
    for qid in ("q1", "q2", "q3"):
        _wait_until(lambda: qid in handle.release)
        handle.release[qid].set()
    _wait_until(lambda: "q4" in handle.sent)  # sent while q0 is still out
    assert not handle.release["q0"].is_set() and results == []
    assert len(set(handle.sent)) == 5
    handle.release["q0"].set()
    handle.release["q4"].set()
    reader.join(5)
    assert [r["query_id"] for r in results] == [r["query_id"] for r in rows]
    assert [r["text"] for r in results] == [f"answer to q{i}" for i in range(5)]


def test_never_more_than_in_flight_requests_out(handle):
    rows = _rows(6)
    results = []
    reader = threading.Thread(target=lambda: results.extend(_window(rows, in_flight=3)))
    reader.start()
    _wait_until(lambda: len(handle.sent) == 3)
    time.sleep(0.2)
    assert len(handle.sent) == 3  # nothing answered: nothing more sent
    handle.release["q2"].set()
    _wait_until(lambda: len(handle.sent) == 4)
    for qid in [f"q{i}" for i in range(6)]:
        _wait_until(lambda: qid in handle.release)
        handle.release[qid].set()
    reader.join(5)
    assert len(results) == 6


def test_an_abandoned_window_cancels_what_is_out_and_sends_nothing_more(handle):
    rows = _rows(8)
    gen = _window(rows, in_flight=2)
    handle.release.update({"q0": threading.Event()})
    handle.release["q0"].set()
    first = next(gen)
    assert first["query_id"] == "q0"
    _wait_until(lambda: len(handle.sent) == 3)  # q1 and q2 out
    gen.close()
    out = [q for q in ("q1", "q2") if not handle.responses[q].cancelled]
    assert out == []
    time.sleep(0.2)
    assert handle.sent == ["q0", "q1", "q2"]


def test_a_failed_request_raises_in_its_rows_place(handle):
    def pre(row):
        if row["query_id"] == "q1":
            raise serve_batch.PolicyRequestError("bad row q1")
        return _pre(row)

    for i in range(3):
        handle.release[f"q{i}"] = threading.Event()
        handle.release[f"q{i}"].set()
    gen = serve_batch._by_handle(_rows(3), _endpoint(), pre, _post, in_flight=2)
    assert next(gen)["query_id"] == "q0"
    with pytest.raises(serve_batch.PolicyRequestError, match="q1"):
        next(gen)


def test_an_answer_behind_a_slow_head_is_counted_when_it_arrives(handle):
    """Progress sees every answer as it arrives, with its prompt's token count, though rows come back in order: a
    long first answer must not hide the rows finished behind it (the progress lines and the slow-engine warning
    read these counts)."""
    seen = []
    gen = serve_batch._by_handle(_rows(3), _endpoint(), _pre, _post, in_flight=3,
                                 on_answer=lambda r, prompt: seen.append((r["query_id"], prompt)))
    results = []
    reader = threading.Thread(target=lambda: results.extend(gen))
    reader.start()
    _wait_until(lambda: len(handle.sent) == 3)
    handle.release["q2"].set()
    handle.release["q1"].set()
    _wait_until(lambda: sorted(seen) == [("q1", 11), ("q2", 12)])
    assert results == []  # still in row order: q0 is out
    handle.release["q0"].set()
    reader.join(5)
    assert [r["query_id"] for r in results] == ["q0", "q1", "q2"] and sorted(seen) == [("q0", 10), ("q1", 11), ("q2", 12)]
