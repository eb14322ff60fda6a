"""The HTTP server end to end: real uvicorn on 127.0.0.1 (a free port), real HTTP with httpx.

A tiny random LLaMA and a character tokenizer keep it fast; every answer is compared with the
same request run alone through HF generate (greedy).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix
from prefixtune.serve import PrefixStore, ServeConfig, create_app
from prefixtune.serve.sampling import decode
from prefixtune.serve.testing import ServerThread, char_tokenizer

from conftest import one_torch_thread_impl, tiny

BASE = "tiny-llama"
PROMPTS = ["hello", "The quick brown fox", "xy", "a much longer prompt, with commas", "Z", "data: 42"]


def random_prefix(model, length: int, seed: int) -> MergedPrefix:
    g = torch.Generator().manual_seed(seed)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g)
          for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
    return MergedPrefix(kv=kv, meta={"method": "prefix"})


class World:
    """The model, tokenizer, prefix files and single-request references shared by the tests."""

    def __init__(self, tmp):
        self.model, self.tok = tiny("llama"), char_tokenizer()
        self.tmp = tmp
        self.prefixes: dict[str, MergedPrefix] = {}
        self.files: dict[str, bytes] = {}
        for i in range(10):  # p0..p7 for the load test, p8/p9 for the hot add/remove
            name = f"p{i}"
            self.prefixes[name] = random_prefix(self.model, 2 + i % 4, seed=100 + i)
            path = pt.save_prefix(self.prefixes[name], tmp / f"{name}.safetensors", model=self.model)
            self.files[name] = path.read_bytes()
        self._refs: dict = {}
        self._lock = threading.Lock()

    def reference(self, prefix_name: str | None, prompt: str, max_tokens: int) -> str:
        """The text of this request run alone (HF generate, greedy), cached."""
        return self.reference_with_reason(prefix_name, prompt, max_tokens)[0]

    def reference_with_reason(self, prefix_name: str | None, prompt: str, max_tokens: int) -> tuple[str, str]:
        key = (prefix_name, prompt, max_tokens)
        with self._lock:
            if key not in self._refs:
                prefix = self.prefixes[prefix_name] if prefix_name else None
                ids = self.tok(prompt)["input_ids"]
                out = pt.generate_mixed(self.model, [prefix], input_ids=torch.tensor([ids]),
                                        max_new_tokens=max_tokens, do_sample=False)[0, len(ids):].tolist()
                eos = self.model.generation_config.eos_token_id
                self._refs[key] = (decode(self.tok, out[:out.index(eos)] if eos in out else out),
                                   "stop" if eos in out else "length")
            return self._refs[key]


one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("prefixes"))


def start_server(world, tmp_path, **config) -> tuple[ServerThread, PrefixStore]:
    store = PrefixStore(tmp_path / "store.db", model=world.model)
    config.setdefault("torch_threads", 1)
    app = create_app(world.model, world.tok, store, ServeConfig(**config), model_id=BASE)
    return ServerThread(app).start(), store


@pytest.fixture
def serve(world, tmp_path):
    """serve(**config): a fresh server and a key for alice; stopped after the test. (Imported by the test
    modules that start a server per test.)"""
    servers = []

    def start(**config):
        server, store = start_server(world, tmp_path, **config)
        servers.append(server)
        return server, store, store.add_key("alice"), server.app.state.prefixtune

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """A server with keys for alice and bob; alice owns p0..p3 (p3 public), bob owns nothing yet."""
    server, store = start_server(world, tmp_path_factory.mktemp("server"), batch_window_ms=5)
    keys = {who: store.add_key(who) for who in ("alice", "bob")}
    for name in ("p0", "p1", "p2", "p3"):
        store.add(name, "alice", world.tmp / f"{name}.safetensors", public=(name == "p3"))
    yield server, store, keys
    server.stop()


def client(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def complete(c: httpx.Client, model: str, prompt, max_tokens: int = 8, **extra) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, **extra})


def upload(c: httpx.Client, name: str, data: bytes, public: bool = False, filename: str = "p.safetensors"):
    return c.post("/v1/prefixes", data={"name": name, "public": str(public).lower()},
                  files={"file": (filename, data, "application/octet-stream")})


# --------------------------------------------------------------------------------------------


def test_concurrent_mixed_requests_equal_each_request_alone(world, server):
    server, store, keys = server
    cases = [(name, prompt) for name in ("p0", "p1", "p2", "p3", BASE) for prompt in PROMPTS[:4]]
    with client(server, keys["alice"]) as c, ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(c, case[0], case[1], max_tokens=10), cases))
    assert server.app.state.prefixtune.batcher.largest_batch > 1  # they did share batches
    for (name, prompt), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        want, reason = world.reference_with_reason(None if name == BASE else name, prompt, 10)
        assert body["choices"][0]["text"] == want
        assert body["object"] == "text_completion" and body["model"] == name and body["id"].startswith("cmpl-")
        assert body["choices"][0]["finish_reason"] == reason
        u = body["usage"]
        assert u["prompt_tokens"] == len(prompt) and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert len({r.json()["choices"][0]["text"] for r in responses}) > len(cases) // 2  # prefixes matter


def test_prompt_list_and_stop_strings(world, server):
    server, _, keys = server
    with client(server, keys["alice"]) as c:
        r = complete(c, "p1", PROMPTS[:3], max_tokens=12)
        assert [ch["text"] for ch in r.json()["choices"]] == [world.reference("p1", p, 12) for p in PROMPTS[:3]]
        assert [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2]
        prompt = max(PROMPTS, key=lambda p: len(world.reference("p1", p, 12)))
        full = world.reference("p1", prompt, 12)
        assert len(full) >= 6
        stop = full[4:6]
        r = complete(c, "p1", prompt, max_tokens=12, stop=[stop, "never"])
        assert r.json()["choices"][0] == {"text": full[:full.find(stop)], "index": 0, "logprobs": None,
                                          "finish_reason": "stop"}


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_chunks_concatenate_to_the_plain_answer(world, server):
    server, _, keys = server
    with client(server, keys["alice"]) as c:
        for extra in ({}, {"stop": "e"}):
            plain = complete(c, "p2", ["The quick brown fox", "xy"], max_tokens=15, **extra).json()
            with c.stream("POST", "/v1/completions",
                          json={"model": "p2", "prompt": ["The quick brown fox", "xy"], "max_tokens": 15,
                                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = sse_events(r)
            assert events[-1] == "[DONE]"
            chunks = [e for e in events[:-1] if e["choices"]]
            assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
            for index, choice in enumerate(plain["choices"]):
                mine = [ch for e in chunks for ch in e["choices"] if ch["index"] == index]
                assert "".join(ch["text"] for ch in mine) == choice["text"]
                assert [ch["finish_reason"] for ch in mine if ch["finish_reason"]] == [choice["finish_reason"]]
                assert len(mine) > 2  # really streamed in pieces
            assert events[-2]["usage"] == plain["usage"]


def test_auth_and_isolation_between_owners(world, server):
    server, store, keys = server
    with client(server, None) as anonymous, client(server, "pt-not-a-key") as forged:
        assert complete(anonymous, "p0", "hi").status_code == 401
        r = forged.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "invalid API key" in r.json()["error"]["message"]
    with client(server, keys["alice"]) as alice, client(server, keys["bob"]) as bob:
        assert {m["id"] for m in alice.get("/v1/models").json()["data"]} == {BASE, "p0", "p1", "p2", "p3"}
        assert {m["id"] for m in bob.get("/v1/models").json()["data"]} == {BASE, "p3"}  # p3 is public
        # alice's private p0 does not exist for bob: not listed, not usable, not deletable, not shown
        nobody = complete(bob, "nobody-has-this", "hi").json()["error"]["message"]
        for r in (complete(bob, "p0", "hi"), bob.delete("/v1/prefixes/p0"), bob.get("/v1/prefixes/p0")):
            assert r.status_code == 404, r.text
            assert r.json()["error"]["message"] == nobody.replace("nobody-has-this", "p0")  # no hint it exists
        # bob may use the public p3 but not delete it
        assert complete(bob, "p3", "hello").json()["choices"][0]["text"] == world.reference("p3", "hello", 8)
        assert bob.delete("/v1/prefixes/p3").status_code == 403
        # bob's own p0 is a different prefix; each owner gets their own
        assert upload(bob, "p0", world.files["p5"]).status_code == 201
        assert complete(bob, "p0", "hello").json()["choices"][0]["text"] == world.reference("p5", "hello", 8)
        assert complete(alice, "p0", "hello").json()["choices"][0]["text"] == world.reference("p0", "hello", 8)
        assert bob.delete("/v1/prefixes/p0").status_code == 200
        assert complete(alice, "p0", "hello").status_code == 200  # alice's p0 untouched
        # a public name is unique
        assert upload(bob, "p3", world.files["p5"], public=True).status_code == 409
    bob_key = store.add_key("bob")
    assert store.remove_key(bob_key)
    with client(server, bob_key) as removed:
        assert removed.get("/v1/models").status_code == 401


def test_bad_uploads_are_refused_with_the_reason(world, server, tmp_path):
    server, store, keys = server
    other = tiny("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)  # same shapes, different weights: a different base model
    wrong = pt.save_prefix(world.prefixes["p4"], tmp_path / "wrong.safetensors", model=other).read_bytes()
    tensor_pickle = io.BytesIO()
    torch.save({"prefix.self": world.prefixes["p4"].kv["self"]}, tensor_pickle)
    cases = {
        "wrong-model": (wrong, "fingerprint"),
        "truncated": (world.files["p4"][:20], "truncated"),
        "garbage": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "damaged"),
        "torch-save": (tensor_pickle.getvalue(), "pickle"),
        "pickle": (pickle.dumps({"a": 1}, protocol=4), "pickle"),
        # saved without the model: nothing says which base model it belongs to
        "no-fingerprint": (pt.save_prefix(world.prefixes["p4"], tmp_path / "nofp.safetensors").read_bytes(), "base model"),
    }
    with client(server, keys["alice"]) as c:
        for name, (data, reason) in cases.items():
            r = upload(c, name, data, filename=f"{name}.bin")
            assert r.status_code == 400, (name, r.text)
            message = r.json()["error"]["message"]
            assert reason in message and f"{name}.bin" in message, (name, message)
            assert c.get(f"/v1/prefixes/{name}").status_code == 404
        assert upload(c, "bad name", world.files["p4"]).status_code == 400
        assert upload(c, BASE, world.files["p4"]).status_code == 400
        assert c.post("/v1/prefixes", data={"name": "nofile"}).status_code == 400
    used = {r.file.name for r in store.list()} | {".prefixtune-store"}  # the folder's owner marker
    leftovers = [f for f in store.files_dir.iterdir() if f.name not in used]
    assert leftovers == []  # refused files leave nothing behind


def test_bad_requests_get_400_with_a_message(server):
    server, _, keys = server
    with client(server, keys["alice"]) as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
        for body, field in [({"model": "p0", "prompt": "x", "temperature": -1}, "temperature"),
                            ({"model": "p0", "prompt": "x", "max_tokens": 0}, "max_tokens"),
                            ({"model": "p0", "prompt": 5}, "prompt"),
                            ({"model": "p0", "prompt": []}, "prompt"),
                            ({"model": "p0", "prompt": "x", "top_p": 0}, "top_p"),
                            ({"model": "p0", "prompt": "x", "n": 2}, "n"),
                            ({"prompt": "x"}, "model"),
                            ({"model": "p0", "prompt": "x", "max_tokens": 10**6}, "max_tokens")]:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 400, body
            assert field in r.json()["error"]["message"], r.json()


def test_metrics_and_health(server):
    server, _, keys = server
    with client(server, keys["alice"]) as c:
        assert complete(c, "p0", "hello").status_code == 200
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in ("prefixtune_queue_depth ", "prefixtune_batch_size_bucket{le=\"+Inf\"}", "prefixtune_tokens_per_second ",
                 "prefixtune_request_latency_seconds_count ", "# TYPE prefixtune_generated_tokens_total counter"):
        assert name in text, name
    tokens = next(line for line in text.splitlines() if line.startswith("prefixtune_generated_tokens_total "))
    assert float(tokens.split()[1]) > 0
    assert 'prefixtune_http_requests_total{route="/v1/completions",status="200"}' in text


def rss_bytes() -> int:
    """This process's resident memory (the server runs in it), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_GROWTH_BOUND = 150 * 2**20  # measured ~20-40 MB; the bound leaves room for allocator noise, not for a leak


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_load_overflow_hot_add_remove(world, tmp_path):
    """The load test: 500 requests from 20 clients over 8 prefixes, a small queue and a small work
    budget, one client uploading and deleting a prefix meanwhile. Every accepted answer equals that
    request alone, the overflow gets 429, a removed prefix answers 404, the running batch never
    exceeds its token-slot budget, and the process's RSS grows by less than RSS_GROWTH_BOUND."""
    budget = 240  # slots: about 5 rows of these requests, so both the queue and the budget turn work away
    server, store = start_server(world, tmp_path, max_batch_size=8, max_queue=4, batch_window_ms=2, retry_after_s=1,
                                 max_batch_tokens=budget)
    owner_key = store.add_key("alice")
    names = [f"p{i}" for i in range(8)]
    for name in names:
        store.add(name, "alice", world.tmp / f"{name}.safetensors")
    cases = [(n, p, 4 + (i % 5)) for i, (n, p) in enumerate((n, p) for n in names for p in PROMPTS)]
    for case in cases:
        world.reference(*case)
    hot_versions = {world.reference(v, "hello", 6) for v in ("p8", "p9")}
    counts = {"ok": 0, "429": 0, "hot-ok": 0, "hot-404": 0}
    lock = threading.Lock()
    failures: list = []
    stop_hot = threading.Event()

    def load_client(seed: int):
        rng = random.Random(seed)
        with client(server, owner_key) as c:
            for _ in range(25):
                if rng.random() < 0.1:  # now and then, the prefix being added and removed
                    r = complete(c, "hot", "hello", max_tokens=6)
                    kind = "hot-ok" if r.status_code == 200 else "hot-404" if r.status_code == 404 else "429"
                    if r.status_code == 200 and r.json()["choices"][0]["text"] not in hot_versions:
                        failures.append(("hot", r.text))
                else:
                    name, prompt, n = rng.choice(cases)
                    r = complete(c, name, prompt, max_tokens=n)
                    kind = "ok" if r.status_code == 200 else "429"
                    if r.status_code == 200 and r.json()["choices"][0]["text"] != world.reference(name, prompt, n):
                        failures.append((name, prompt, r.text))
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
                    time.sleep(rng.uniform(0.005, 0.03))  # a polite client would wait Retry-After
                elif r.status_code not in (200, 404):
                    failures.append(("status", r.status_code, r.text))
                with lock:
                    counts[kind] += 1

    def hot_admin():
        with client(server, owner_key) as c:
            rounds = 0
            while not stop_hot.is_set() and rounds < 20:
                version = ("p8", "p9")[rounds % 2]
                r = upload(c, "hot", world.files[version])
                if r.status_code != 201:
                    failures.append(("upload", r.text))
                    return
                time.sleep(0.05)
                if c.delete("/v1/prefixes/hot").status_code != 200:
                    failures.append(("delete", rounds))
                r = complete(c, "hot", "hello", max_tokens=6)  # removed: never served again
                if r.status_code != 404:
                    failures.append(("served after remove", r.status_code, r.text))
                rounds += 1

    batcher = server.app.state.prefixtune.batcher
    samples = {"rss": [], "slots": []}
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            samples["rss"].append(rss_bytes())
            samples["slots"].append(batcher.batch_slots)
            time.sleep(0.01)

    for _ in range(3):  # warm up: first batches allocate what every later one reuses
        with client(server, owner_key) as c:
            assert complete(c, "p0", PROMPTS[3], max_tokens=8).status_code == 200
    baseline = rss_bytes()
    sampler = threading.Thread(target=sample)
    sampler.start()
    admin = threading.Thread(target=hot_admin)
    admin.start()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(load_client, range(20)))
    stop_hot.set()
    admin.join(30)
    sampling.set()
    sampler.join()
    with client(server, owner_key) as c:
        health = c.get("/health")
    server.stop()
    assert failures == []
    assert sum(counts.values()) == 500
    assert counts["ok"] > 50 and counts["429"] > 0, counts
    assert health.status_code == 200 and health.json()["queue_depth"] == 0
    growth = max(samples["rss"]) - baseline
    print(f"load test: {counts}; RSS {baseline / 2**20:.0f} MB before, peak +{growth / 2**20:.1f} MB; "
          f"batch slots peak {max(samples['slots'])} of {budget}; largest batch {batcher.largest_batch}")
    assert max(samples["slots"]) <= budget
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.0f} MB under load"


def test_timeout_gives_504_and_graceful_shutdown_finishes_accepted_requests(world, tmp_path):
    server, store = start_server(world, tmp_path, request_timeout_s=0.2, max_tokens_limit=4000)
    key = store.add_key("carol")
    with client(server, key) as c:
        r = complete(c, BASE, "hello", max_tokens=1900)  # far longer than 0.2 s
        assert r.status_code == 504 and "did not finish" in r.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "ok"
    state = server.app.state.prefixtune
    # The 504 cancels its rows; wait until they are gone so that "running" below means the new request.
    deadline = time.monotonic() + 30
    while state.batcher.running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert state.batcher.running == 0, "the timed-out request's rows were never cancelled"
    state.config.request_timeout_s = 60
    result = {}

    def long_request():
        with client(server, key) as c:
            result["response"] = complete(c, BASE, "hello", max_tokens=300)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while state.batcher.running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert state.batcher.running > 0, "the long request never started"
    server.stop()  # uvicorn stops listening, lets the open request finish, then the worker drains
    t.join(30)
    r = result["response"]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == world.reference(None, "hello", 300)
    assert not state.batcher.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_a_stored_file_changed_on_disk_is_refused(world, server):
    server, store, keys = server
    with client(server, keys["bob"]) as bob:
        assert upload(bob, "fragile", world.files["p6"]).status_code == 201
        record = store.get("fragile", "bob")
        data = bytearray(record.file.read_bytes())
        data[-1] ^= 0xFF  # flip a bit of the stored copy before it was ever loaded
        record.file.write_bytes(bytes(data))
        r = complete(bob, "fragile", "hello")
        assert r.status_code == 500 and "changed" in r.json()["error"]["message"]
        assert str(record.file) not in r.text  # no server paths in answers
        assert bob.delete("/v1/prefixes/fragile").status_code == 200
