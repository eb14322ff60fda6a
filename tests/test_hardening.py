"""Issue 17, hardening round two: each fault found from outside, as a test that failed before its fix.

Server: lone surrogates, unexpected errors, disconnects, the prefix cache's byte budget, the sweep of
crashed uploads' temp files. CLI: stores that are folders or not databases, and every check that a
file, path or value decides made before the model loads.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix, parse_safetensors
from prefixtune.files import PrefixFileError
from prefixtune.serve import PrefixStore
from prefixtune.serve.prefix_cache import PrefixCache, watch_store
from prefixtune.serve.store_errors import StoreError

from conftest import one_torch_thread_impl, tiny
from test_cli_errors import _run, assets  # noqa: F401 (assets is a fixture)
from test_serve import BASE, client, complete, serve, world  # noqa: F401 (serve and world are fixtures)

one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)


def raw_post(c: httpx.Client, body: str) -> httpx.Response:
    """POST a JSON text as is (json.dumps escapes a lone surrogate as \\ud800: valid JSON)."""
    return c.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})


# -- the server ------------------------------------------------------------------------------------

def test_lone_surrogates_get_400_naming_the_field_and_keep_the_connection(world, serve, caplog):
    server, store, key, _ = serve()
    store.add("p0", "alice", world.tmp / "p0.safetensors")
    cases = {"prompt": {"model": BASE, "prompt": "ab\ud800cd"},
             "model": {"model": "a\ud800", "prompt": "x"},
             "prompt ": {"model": "p0", "prompt": ["ok", "\udfff"]},
             "stop": {"model": BASE, "prompt": "x", "stop": ["\ud83d"]}}
    with caplog.at_level(logging.ERROR), client(server, key) as c:
        for field, body in cases.items():
            for _ in range(3):
                r = raw_post(c, json.dumps(body))
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["param"] == field.strip() and field.strip() in err["message"], err
                assert "surrogate" in err["message"]
            # the same keep-alive connection still answers
            assert complete(c, BASE, "hello").json()["choices"][0]["text"] == world.reference(None, "hello", 8)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_an_unexpected_error_is_one_json_500_and_no_reset(world, serve, caplog):
    server, store, key, state = serve()
    with caplog.at_level(logging.ERROR), client(server, key) as c, \
            mock.patch.object(state, "lookup", side_effect=TypeError("a bug")):
        for _ in range(3):
            r = complete(c, BASE, "hello")
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all(r.name == "prefixtune.serve" for r in errors), [r.getMessage() for r in errors]


def test_a_disconnect_leaves_no_unretrieved_future_in_the_log(world, serve, caplog):
    import gc

    server, store, key, state = serve(max_tokens_limit=2000)
    # Each decode step sleeps 5 ms, so 1,900 tokens take >= 9.5 s on any machine: the 1 s read timeout
    # always fires mid-generation (a fast CI machine once finished the whole request inside it).
    slow = world.model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))
    with slow, caplog.at_level(logging.ERROR, logger="asyncio"), client(server, key) as c:
        for n in range(1, 3):
            with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-generation and closes the connection
                c.post("/v1/completions", json={"model": BASE, "prompt": ["b", "b"], "max_tokens": 1900,
                                                "temperature": 0}, timeout=httpx.Timeout(60, read=1.0))
            deadline = time.monotonic() + 15
            while (state.metrics.cancelled.value("disconnect") < n or state.batcher.running) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state.metrics.cancelled.value("disconnect") >= n and state.batcher.running == 0
        slow.remove()  # (the `with` removes it too if an assertion fails first)
        assert complete(c, BASE, "x").status_code == 200
        time.sleep(0.3)
        gc.collect()  # asyncio logs an unretrieved exception when the future is collected
        time.sleep(0.3)
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


def test_the_prefix_cache_is_bounded_in_bytes(world, tmp_path):
    store = PrefixStore(tmp_path / "s.db", model=world.model)
    records = [store.add(f"p{i}", "alice", world.tmp / f"p{i}.safetensors") for i in (4, 5, 6, 7)]
    sizes = [pt.load_prefix(world.tmp / f"p{i}.safetensors").num_values() * 4 for i in (4, 5, 6, 7)]
    budget = sizes[2] + sizes[3]  # the last two fit exactly: the first two are dropped for them
    cache = PrefixCache(store, capacity=64, max_bytes=budget)
    for r in records:
        cache.get(r)
        assert cache.nbytes <= budget
    assert len(cache) == 2 and cache.nbytes == sizes[2] + sizes[3]
    small = PrefixCache(store, capacity=64, max_bytes=sizes[0] - 1)  # larger than the budget: served, not kept
    assert small.get(records[0]).prefix.length == 2 + 4 % 4 and len(small) == 0 and small.nbytes == 0
    cache.invalidate(records[3].id)
    assert cache.nbytes == sizes[2]


def test_serve_config_and_metrics_carry_the_byte_budget(world, serve):
    from prefixtune.serve import ServeConfig

    assert ServeConfig().prefix_cache_bytes == 512 * 2**20
    server, store, key, state = serve(prefix_cache_bytes=10**6)
    store.add("p0", "alice", world.tmp / "p0.safetensors")
    with client(server, key) as c:
        assert complete(c, "p0", "hi").status_code == 200
        want = pt.load_prefix(world.tmp / "p0.safetensors").num_values() * 4
        assert f"prefixtune_cached_prefix_bytes {want}" in c.get("/metrics").text


def test_a_parsed_file_costs_its_size_once(world):
    """The tensors are views of the buffer the file was read into: no second copy per loaded prefix."""
    buf = bytearray((world.tmp / "p6.safetensors").read_bytes())
    tensors, _ = parse_safetensors(buf, "p6")
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for t in tensors.values():
        assert start <= t.data_ptr() < start + len(buf)
    t = tensors["prefix.self"]
    assert torch.equal(t, world.prefixes["p6"].kv["self"])
    t.add_(1)  # writable, and owned by this buffer only: the file is untouched
    assert not torch.equal(pt.load_prefix(world.tmp / "p6.safetensors").kv["self"], t)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "s.db", None
    return request.getfixturevalue("postgres").create_database(), tmp_path / "shared-files"


def test_the_periodic_sweep_removes_a_crashed_writers_temp_file(store_location, caplog):
    """A replica killed mid-upload leaves .add-*.tmp in the shared folder; another replica's periodic
    sweep removes it once no live writer holds it and it is older than the grace, without restarting."""
    from prefixtune.serve.store import TEMP_GRACE_S

    location, files_dir = store_location
    store = PrefixStore(location, files_dir=files_dir)
    folder = store.files_dir
    old = time.time() - TEMP_GRACE_S - 5
    dead, live, fresh = folder / ".add-dead.tmp", folder / ".add-live.tmp", folder / ".add-fresh.tmp"
    for f in (dead, live, fresh):
        f.write_bytes(b"x" * 4096)
    os.utime(dead, (old, old))
    os.utime(live, (old, old))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer (an upload waiting for its commit)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_store, args=(store, PrefixCache(store), stop, 0.05, 0.05), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="prefixtune.serve"):
            watcher.start()
            deadline = time.monotonic() + 10
            while dead.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # more sweeps: the others stay
    finally:
        stop.set()
        watcher.join(5)
        os.close(fd)
        store.close()
    assert not dead.exists() and live.exists() and fresh.exists()
    assert any(".add-dead.tmp" in r.getMessage() for r in caplog.records)


def test_a_store_that_is_a_folder_or_not_a_database_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    with pytest.raises(StoreError, match="folder"):
        PrefixStore(tmp_path / "folder")
    with pytest.raises(StoreError, match="not a prefix store"):
        PrefixStore(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "not a database\n" * 100


# -- the CLI ---------------------------------------------------------------------------------------

def _no_model_load():
    """Fails the test if a command loads a model (every check here must come before that)."""
    return mock.patch("prefixtune.models.load_model", side_effect=AssertionError("the model was loaded"))


def _one_error(r, *words):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(assets, tmp_path_factory):  # noqa: F811
    """A valid prefix file for the tiny model, and damaged copies of it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root, model_dir, good = assets
    out = tmp_path_factory.mktemp("bad-files")
    model = pt.load_model(str(model_dir))[0]
    ok = pt.save_prefix(pt.PrefixModel(model, pt.PrefixConfig(length=2)).export(), out / "ok.safetensors", model=model)
    with safe_open(ok, "pt") as f:
        meta = f.metadata()
    tensors = load_file(ok)
    files = {"ok": ok}
    (out / "truncated.safetensors").write_bytes(ok.read_bytes()[:-40])
    files["truncated"] = out / "truncated.safetensors"
    nan = {k: v.clone() for k, v in tensors.items()}
    nan["prefix.self"][0, 0, 0, 0, 0] = float("nan")
    save_file(nan, out / "nan.safetensors", metadata=meta)
    files["nan"] = out / "nan.safetensors"
    save_file(tensors, out / "shape.safetensors", metadata={**meta, "length": "3"})
    files["shape"] = out / "shape.safetensors"
    save_file(tensors, out / "fingerprint.safetensors", metadata={**meta, "fingerprint": "not-a-fingerprint"})
    files["fingerprint"] = out / "fingerprint.safetensors"
    save_file(tensors, out / "other.safetensors", metadata={**meta, "fingerprint": "0123456789abcdef"})
    files["other"] = out / "other.safetensors"
    latin = out / "latin1-run"
    latin.mkdir()
    (latin / "prefix.safetensors").write_bytes(ok.read_bytes())
    (latin / "run.json").write_bytes(b'{"data": {"dataset": "caf\xe9"}}')
    files["latin1-run"] = latin / "prefix.safetensors"
    return files, model_dir, good


@pytest.mark.parametrize("case, words", [("truncated", ["truncated"]), ("nan", ["NaN"]), ("shape", ["shape"]),
                                         ("fingerprint", ["fingerprint"])])
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_damaged_prefix_file_is_refused_before_the_model_loads(bad_files, tmp_path, case, words, command):
    files, model_dir, good = bad_files
    args = (["generate", "--input", "w5"] if command == "generate" else
            ["evaluate", "--dataset", "jsonl", "--path", good, "--split", "all", "--out", tmp_path / "eval"])
    with _no_model_load():
        r = _run(*args, "--prefix", files[case], "--model", model_dir)
    _one_error(r, files[case], *words)


def test_an_ensemble_of_files_for_different_base_models_is_refused_before_the_load(bad_files):
    files, model_dir, _ = bad_files
    with _no_model_load():
        r = _run("generate", "--input", "w5", "--prefix", files["ok"], "--prefix", files["other"], "--do-sample")
    _one_error(r, "different base models", "0123456789abcdef")


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1", "--do-sample"], ["--temperature"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--temperature", "5e-324", "--do-sample"], ["--temperature", "1e-5", "--do-sample"]),  # would sample NaN
    (["--do-sample", "--top-p", "0"], ["--top-p"]),
    (["--num-beams", "0"], ["--num-beams"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
])
def test_generate_values_are_checked_before_the_load(bad_files, args, words):
    files, model_dir, _ = bad_files
    with _no_model_load():
        r = _run("generate", "--input", "w5", "--prefix", files["ok"], *args)
    _one_error(r, *words)


@pytest.mark.parametrize("extra, words", [
    (["--eval-size", "-1"], ["--eval-size"]),
    (["--eval-size", "0"], ["--eval-size"]),
    (["--seed", str(2**70)], ["--seed"]),
])
def test_evaluate_values_are_checked_before_the_load(bad_files, tmp_path, extra, words):
    files, model_dir, good = bad_files
    with _no_model_load():
        r = _run("evaluate", "--prefix", files["ok"], "--dataset", "jsonl", "--path", good, "--split", "all",
                 "--out", tmp_path / "eval", *extra)
    _one_error(r, *words)


def test_evaluate_out_not_writable_is_refused_before_the_load(bad_files, tmp_path):
    files, model_dir, good = bad_files
    if os.geteuid() == 0:  # root writes through permissions: use a folder nobody can write in
        out = Path("/proc/self/prefixtune-eval")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "eval"
    with _no_model_load():
        r = _run("evaluate", "--prefix", files["ok"], "--dataset", "jsonl", "--path", good, "--split", "all",
                 "--out", out)
    _one_error(r, "--out", out)


def test_a_non_utf8_run_json_is_named(bad_files, tmp_path):
    files, model_dir, good = bad_files
    with _no_model_load():
        r = _run("evaluate", "--prefix", files["latin1-run"], "--dataset", "jsonl", "--path", good, "--split", "all",
                 "--out", tmp_path / "eval")
    _one_error(r, files["latin1-run"].parent / "run.json", "UTF-8")


def test_train_seed_out_of_range_is_one_error_line(bad_files, tmp_path):
    files, model_dir, good = bad_files
    with _no_model_load():
        r = _run("train", "--model", model_dir, "--dataset", "jsonl", "--path", good, "--out", tmp_path / "run",
                 "--seed", str(2**70))
    _one_error(r, "--seed", str(2**70))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_keys_add_to_a_store_that_is_not_one(tmp_path, kind):
    store = tmp_path / "store"
    if kind == "folder":
        store.mkdir()
    else:
        store.write_text("hello\n")
    _one_error(_run("keys", "add", "alice", "--store", store), store)


def test_serve_checks_its_store_before_the_model_loads(bad_files, tmp_path):
    _, model_dir, _ = bad_files
    store = tmp_path / "notes.txt"
    store.write_text("not a database\n")
    with _no_model_load():
        r = _run("serve", "--model", model_dir, "--store", store, "--port", "0")
    _one_error(r, store, "not a prefix store")
    with _no_model_load():
        r = _run("serve", "--model", model_dir, "--store", tmp_path / "s.db", "--max-prefix-cache-bytes", "-1")
    _one_error(r, "prefix_cache_bytes")


def test_usage_errors_are_one_line(bad_files):
    _one_error(_run("generate", "--num-beams", "many", "--input", "x"), "--num-beams")
    _one_error(_run("generate", "--no-such-option"), "--no-such-option")
