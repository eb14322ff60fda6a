"""The server's guarantees under faults (issue 8): a changed file is never served, the work a request
may cost is bounded, a client that leaves or times out frees its rows, strict request types, and the
key and body size are checked before the body is read. Real uvicorn + httpx, tiny random LLaMA."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from test_serve import BASE, client, complete, serve, upload, world  # noqa: F401 (serve and world are fixtures)

from conftest import one_torch_thread_impl

one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_changed_or_truncated_file_is_never_served(world, serve, caplog):
    server, store, key, state = serve()
    with client(server, key) as c:
        assert upload(c, "frag", world.files["p6"]).status_code == 201
        want = world.reference("p6", "hello", 8)
        assert complete(c, "frag", "hello").json()["choices"][0]["text"] == want
        file = store.get("frag", "alice").file
        file.write_bytes(world.files["p2"])  # overwritten in place by another valid prefix of the same size
        assert len(world.files["p2"]) == len(world.files["p6"])
        # the loaded copy owns its memory: still exactly the uploaded prefix
        assert complete(c, "frag", "hello").json()["choices"][0]["text"] == want
        state.prefixes.clear()  # evicted: the next request reads the file again
        with caplog.at_level(logging.ERROR, logger="prefixtune.serve"):
            r = complete(c, "frag", "hello")
        assert r.status_code == 500 and r.json()["error"]["type"] == "prefix_integrity_error", r.text
        assert "changed since it was added" in r.json()["error"]["message"] and str(file) not in r.text
        assert any("refusing to serve prefix 'frag'" in rec.getMessage() for rec in caplog.records)
        with open(file, "r+b") as f:
            f.truncate(0)  # `truncate -s 0`: used to kill the process with a bus error
        for _ in range(2):  # refused each time, cached or not
            r = complete(c, "frag", "hello")
            assert r.status_code == 500 and r.json()["error"]["type"] == "prefix_integrity_error"
        assert c.get("/health").json()["status"] == "ok"
        assert complete(c, BASE, "hello").status_code == 200  # the server goes on serving


def test_a_request_over_the_work_budget_is_refused(serve):
    server, store, key, state = serve(max_batch_tokens=200, max_prompt_tokens=40)
    with client(server, key) as c:
        r = complete(c, BASE, "x" * 41, max_tokens=1)
        assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"]["message"]
        r = complete(c, BASE, "hello", max_tokens=196)  # 5 + 196 slots
        assert r.status_code == 400 and "needs 201 token slots" in r.json()["error"]["message"]
        assert "max_batch_tokens" in r.json()["error"]["message"]
        r = complete(c, BASE, ["hello"] * 3, max_tokens=62)  # each prompt fits; the request cannot
        assert r.status_code == 400 and "needs 201 token slots" in r.json()["error"]["message"]
        assert complete(c, BASE, "hello", max_tokens=8).status_code == 200
        metrics = c.get("/metrics").text
    assert "prefixtune_batch_token_slots " in metrics


def test_a_client_that_leaves_a_non_streaming_request_frees_its_rows(serve):
    server, store, key, state = serve(max_tokens_limit=2000)
    with client(server, key) as c:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post("/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 1900, "temperature": 0},
                   timeout=httpx.Timeout(60, read=0.5))
        assert wait_until(lambda: state.metrics.cancelled.value("disconnect") == 1, 10)
        assert wait_until(lambda: state.batcher.running == 0, 5)
        steps = state.batcher.steps
        time.sleep(0.2)
        assert state.batcher.steps == steps  # nothing is decoding for it any more
        assert steps < 1900
        assert 'prefixtune_cancelled_requests_total{reason="disconnect"} 1' in c.get("/metrics").text


def test_a_timed_out_request_is_cancelled(serve):
    server, store, key, state = serve(request_timeout_s=0.3, max_tokens_limit=2000)
    with client(server, key) as c:
        r = complete(c, BASE, "hello", max_tokens=1900)
        assert r.status_code == 504 and "did not finish" in r.json()["error"]["message"]
        assert state.metrics.cancelled.value("timeout") == 1
        assert wait_until(lambda: state.batcher.running == 0, 5)
        assert state.batcher.steps < 1900


def test_openai_fields_have_strict_types(serve):
    server, store, key, state = serve()
    with client(server, key) as c:
        for field, value in [("seed", 2**70), ("seed", -(2**70)), ("max_tokens", "3"), ("max_tokens", True),
                             ("max_tokens", 2.5), ("stream", "yes"), ("temperature", "0"), ("n", "1"),
                             ("prompt", 5), ("model", 7)]:
            r = c.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2, field: value})
            assert r.status_code == 400, (field, value, r.text)
            assert field in r.json()["error"]["message"], r.json()
        ok = c.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2, "temperature": 0,
                                             "top_p": 1, "seed": 2**63 - 1, "stream": False})
        assert ok.status_code == 200, ok.text


def raw_request(server, head: str, body: bytes = b"") -> tuple[str, float]:
    """Send a request head (and maybe part of a body) over a socket; the status line and how long it took."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(head.encode() + body)
        status = s.recv(4096).split(b"\r\n", 1)[0].decode()
    return status, time.monotonic() - start


def test_key_and_size_are_checked_before_the_body_is_read(world, serve):
    """A 200 MB body is declared but never sent: the answer comes at once, so nothing waited for it."""
    server, store, key, state = serve(max_upload_mb=0.05, max_request_kb=4)
    huge = "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 200000000\r\n{auth}\r\n"
    upload_head = dict(path="/v1/prefixes", ctype="multipart/form-data; boundary=b")
    status, took = raw_request(server, huge.format(**upload_head, auth=""))
    assert status.endswith("401 Unauthorized") and took < 5
    status, took = raw_request(server, huge.format(**upload_head, auth="Authorization: Bearer pt-forged\r\n"))
    assert status.endswith("401 Unauthorized") and took < 5
    status, took = raw_request(server, huge.format(**upload_head, auth=f"Authorization: Bearer {key}\r\n"))
    assert status.endswith("413 Request Entity Too Large") and took < 5
    status, _ = raw_request(server, huge.format(path="/v1/completions", ctype="application/json",
                                                auth=f"Authorization: Bearer {key}\r\n"))
    assert status.endswith("413 Request Entity Too Large")
    with client(server, key) as c:
        def chunks(n):  # no Content-Length: chunked, so only counting the bytes can stop it
            for _ in range(n):
                yield b"x" * 8192

        r = c.post("/v1/completions", content=chunks(8), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4 KB" in r.json()["error"]["message"], r.text
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n" \
                   b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p\"\r\n\r\n"
        r = c.post("/v1/prefixes", content=iter([boundary] + [b"\0" * 8192] * 20),
                   headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413, r.text
        assert upload(c, "small", world.files["p1"]).status_code == 201  # under the cap: accepted
    assert [r.name for r in store.list("alice")] == ["small"]


def test_upload_refuses_unknown_tensors_and_corrects_the_base_model(world, serve):
    from safetensors.torch import save

    from prefixtune.models import model_name
    from prefixtune.prefix import parse_safetensors

    server, store, key, state = serve()
    tensors, meta = parse_safetensors(world.files["p1"], "p1")
    with client(server, key) as c:
        r = upload(c, "extra", save({**tensors, "payload": world.prefixes["p1"].kv["self"].flatten()}, metadata=meta),
                   filename="extra.safetensors")
        assert r.status_code == 400 and "does not define: ['payload']" in r.json()["error"]["message"]
        r = upload(c, "liar", save(tensors, metadata={**meta, "base_model": "gpt2-xl"}))
        assert r.status_code == 201, r.text
        truth = model_name(world.model)
        assert r.json()["base_model"] == truth and "gpt2-xl" in r.json()["warnings"][0]
        assert c.get("/v1/prefixes/liar").json()["base_model"] == truth
