"""Two real server processes on 127.0.0.1 sharing one PostgreSQL store and one files folder.

Each replica is `prefixtune serve` (tests/replica_server.py) on a tiny random LLaMA saved to disk;
every completion is compared with the same request run alone in this process (HF-style greedy).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix
from prefixtune.serve import PrefixStore
from prefixtune.serve.sampling import decode
from prefixtune.serve.store_sql import MARKER
from prefixtune.serve.testing import char_tokenizer
from prefixtune.serve.testing_pg import Replica

from conftest import tiny

PROMPTS = ["hello", "The quick brown fox", "xy", "data: 42"]
HERE = Path(__file__).parent


def random_prefix(model, length: int, seed: int) -> MergedPrefix:
    g = torch.Generator().manual_seed(seed)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g)
          for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
    return MergedPrefix(kv=kv, meta={"method": "prefix"})


class Refs:
    """Expected greedy texts: each (prefix, prompt) run alone through the engine, cached."""

    def __init__(self, model, tok):
        self.model, self.tok, self.prefixes, self.cache = model, tok, {}, {}
        self.lock = threading.Lock()

    def __call__(self, prefix_name, prompt, max_tokens):
        key = (prefix_name, prompt, max_tokens)
        with self.lock:
            if key not in self.cache:
                ids = self.tok(prompt)["input_ids"]
                prefix = self.prefixes[prefix_name] if prefix_name else None
                out = pt.generate_mixed(self.model, [prefix], input_ids=torch.tensor([ids]), max_new_tokens=max_tokens,
                                        do_sample=False)[0, len(ids):].tolist()
                eos = self.model.generation_config.eos_token_id
                self.cache[key] = decode(self.tok, out[:out.index(eos)] if eos in out else out)
            return self.cache[key]


def stored_files(files: Path) -> set[str]:
    return {p.name for p in files.iterdir() if p.name != MARKER}


def cached_prefixes(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^prefixtune_cached_prefixes (\S+)$", text, re.M).group(1))


def wait_until(check, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def test_two_replicas_share_one_postgresql_store(postgres, tmp_path):
    torch.set_num_threads(1)
    model, tok = tiny("llama"), char_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    refs = Refs(model, tok)
    uploads = {}
    for i in range(5):
        name = f"p{i}"
        refs.prefixes[name] = random_prefix(model, 2 + i % 3, seed=200 + i)
        uploads[name] = pt.save_prefix(refs.prefixes[name], tmp_path / f"{name}.safetensors", model=model).read_bytes()
    url, files = postgres.create_database(), tmp_path / "shared-files"
    admin = PrefixStore(url, files_dir=files)  # what `prefixtune keys add` does
    alice, bob = admin.add_key("alice"), admin.add_key("bob")
    marker = tmp_path / "paused-upload"
    args = ["--model", model_dir, "--store", url, "--files-dir", files, "--threads", "1", "--max-queue", "512",
            "--store-poll", "60",  # the periodic re-check is out of the picture: only NOTIFY can be fast
            "--store-sweep", "1"]
    command = [sys.executable, str(HERE / "replica_server.py")]
    a = Replica(args, command, env={"PREFIXTUNE_TEST_PAUSE_UPLOAD": str(marker)}, log_path=tmp_path / "a.log")
    b = Replica(args, command, log_path=tmp_path / "b.log")
    base = str(model_dir)
    try:
        # Start both at once: they migrate the same fresh database concurrently (the schema lock).
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.start(), (a, b)))
        print(f"both replicas healthy after {time.monotonic() - started:.1f} s")
        http = httpx.Client(timeout=60)

        def upload(replica, name, key, public=False, filename=None, content=None):
            return http.post(replica.url + "/v1/prefixes", headers={"Authorization": f"Bearer {key}"},
                             data={"name": name, "public": str(public).lower()},
                             files={"file": (filename or f"{name}.safetensors", uploads[content or name])})

        def complete(replica, model_name, prompt, key=alice, max_tokens=6):
            return http.post(replica.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

        # Upload on A, complete on B.
        assert upload(a, "p0", alice).status_code == 201
        r = complete(b, "p0", PROMPTS[1])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs("p0", PROMPTS[1], 6)

        # Delete on B: A refuses it, and A's cached copy is dropped by NOTIFY (the poll is 60 s).
        assert complete(a, "p0", PROMPTS[0]).status_code == 200 and cached_prefixes(a.url) == 1
        assert http.delete(b.url + "/v1/prefixes/p0", headers={"Authorization": f"Bearer {alice}"}).status_code == 200
        notify_s = wait_until(lambda: cached_prefixes(a.url) == 0, 5.0, "A drops its cached p0")
        assert complete(a, "p0", PROMPTS[0]).status_code == 404
        print(f"A dropped its cached copy {notify_s * 1000:.0f} ms after B's delete returned")

        # A key revoked (through the shared store: `prefixtune keys rm`) is refused by both at once.
        assert complete(a, base, "x", key=bob).status_code == 200 and complete(b, base, "x", key=bob).status_code == 200
        assert admin.remove_key(bob)
        assert complete(a, base, "x", key=bob).status_code == 401 and complete(b, base, "x", key=bob).status_code == 401

        # A burst: 20 clients, 500 requests split over both replicas, every answer checked.
        for i, name in enumerate(["p1", "p2", "p3", "p4"]):
            assert upload((a, b)[i % 2], name, alice, public=i % 2 == 0).status_code == 201
        jobs = [((a, b)[i % 2], [base, "p1", "p2", "p3", "p4"][i % 5], PROMPTS[i % len(PROMPTS)]) for i in range(500)]
        for _, name, prompt in jobs:
            refs(None if name == base else name, prompt, 2)
        local = threading.local()  # one keep-alive connection per client and replica, as behind a balancer

        def run(job):
            replica, name, prompt = job
            clients = local.__dict__.setdefault("clients", {})
            # idle connections close after 2 s, before the replica's 5 s keep-alive timeout closes them under us
            client = clients.setdefault(replica.url, httpx.Client(timeout=120, limits=httpx.Limits(keepalive_expiry=2)))
            r = client.post(replica.url + "/v1/completions", headers={"Authorization": f"Bearer {alice}"},
                            json={"model": name, "prompt": prompt, "max_tokens": 2, "temperature": 0})
            ok = r.status_code == 200 and r.json()["choices"][0]["text"] == refs(None if name == base else name, prompt, 2)
            return r.status_code, ok

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(run, jobs))
        elapsed = time.monotonic() - started
        accepted = [ok for status, ok in results if status == 200]
        assert all(status in (200, 429) for status, _ in results), {s for s, _ in results}
        assert len(accepted) >= 500 and all(accepted)
        print(f"burst: {len(accepted)}/{len(jobs)} accepted, all correct, {len(jobs) / elapsed:.1f} requests/s")

        # kill -9 A while an upload is between writing its file and committing its row.
        with ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(upload, a, "slow-late", alice, False, "slow.safetensors", "p0")
            wait_until(marker.exists, 60, "A's upload reaches its pause")
            orphan = marker.read_text()
            assert orphan in stored_files(files)  # the file is there, its row is not
            os.kill(a.proc.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                hanging.result(30)
        a.proc.wait()
        r = complete(b, "p2", PROMPTS[2])  # B keeps serving
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs("p2", PROMPTS[2], 6)
        # B's sweep (every 1 s here) deletes the orphan once A's transaction is gone with A.
        wait_until(lambda: orphan not in stored_files(files), 10.0, "the orphan file is swept")
        records = admin.list()
        assert sorted(r.name for r in records) == ["p1", "p2", "p3", "p4"]  # no row from the killed upload
        assert upload(b, "slow-late", alice, content="p0").status_code == 201  # its name was never taken
        records = admin.list()
        assert stored_files(files) == {r.file.name for r in records}  # no file without a row
        assert all(admin.load(r) is not None for r in records)  # and every row has its file, intact
    finally:
        for r in (a, b):
            r.kill()
        admin.close()
