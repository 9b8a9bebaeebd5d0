"""Request bodies over real HTTP (uvicorn on 127.0.0.1, the gateway app without a policy): a body is streamed
against its byte limit and a deadline, and the key's concurrency slot is held from before the body is read until
every path ends, so a slow upload counts against its own key and nothing leaks."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from services.gateway.auth import hash_key
from services.gateway.config import GatewayConfig, KeyConfig

KEY = "st-bodies"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from services.gateway.app import build_app

    cfg = GatewayConfig(keys=[KeyConfig(id="one", sha256=hash_key(KEY), scopes=["inference", "jobs"], max_concurrent=1)],
                        limits={"max_body_bytes": 4096, "body_timeout_s": 1.5},
                        artifact_root=str(tmp_path_factory.mktemp("jobs")))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(cfg), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(10)


def _head(port: int, path: str, extra: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\n{extra}\r\n".encode())
    return s


def _status(s: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def _bad_request(port: int) -> httpx.Response:
    """A whole, small request refused after the body is read (an unknown field): it needs the key's slot."""
    return httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "logprobs": 3},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_slow_upload_holds_its_own_keys_slot_until_its_deadline(server, path):
    slow = _head(server, path, "Content-Length: 200\r\n")
    slow.sendall(b'{"prompt": ')  # and nothing more
    time.sleep(0.3)
    busy = _bad_request(server)
    assert busy.status_code == 429 and "concurrent" in busy.json()["error"]["message"]  # the slot was taken first
    status, body = _status(slow)
    assert status == 408 and "not received within 1.5s" in json.loads(body)["error"]["message"]
    slow.close()
    after = _bad_request(server)
    assert after.status_code == 400 and "'logprobs'" in after.json()["error"]["message"]  # released: no leak


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    s = _head(server, "/v1/chat/completions", "Transfer-Encoding: chunked\r\n")
    piece = b"x" * 3000
    for _ in range(2):  # 6000 bytes > 4096, and the body never ends
        s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    t = time.monotonic()
    status, body = _status(s)
    assert status == 413 and "exceeds the limit of 4096 bytes" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t < 1.4  # refused on the byte count, not at the deadline
    s.close()
    assert _bad_request(server).status_code == 400  # the slot came back


def test_a_declared_oversize_body_is_refused_unread(server):
    s = _head(server, "/v1/jobs", "Content-Length: 100000\r\n")
    status, body = _status(s)
    assert status == 413 and "100000 bytes exceeds the limit of 4096" in json.loads(body)["error"]["message"]
    s.close()
