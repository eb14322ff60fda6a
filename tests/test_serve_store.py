"""The prefix store (SQLite index + managed files + API keys) and the in-memory prefix cache."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix, PrefixFileError
from prefixtune.serve.prefix_cache import PrefixCache
from prefixtune.serve.store import (InvalidName, NotOwner, PrefixExists, PrefixIntegrityError, PrefixNotFound,
                                    PrefixStore)

from conftest import tiny


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture
def files(model, tmp_path):
    out = {}
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        kv = {k: torch.randn(layers, 2, heads, 2 + i, hd, generator=g)
              for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
        out[f"f{i}"] = pt.save_prefix(MergedPrefix(kv=kv, meta={"method": "prefix"}), tmp_path / f"f{i}.safetensors",
                                      model=model)
    return out


def test_add_copies_checks_and_records(model, files, tmp_path):
    store = PrefixStore(tmp_path / "db" / "prefixes.db", model=model)
    record = store.add("news", "alice", files["f1"], public=True)
    assert record.file.parent == tmp_path / "db" / "prefixes-files" and record.file.read_bytes() == files["f1"].read_bytes()
    assert (record.name, record.owner, record.public, record.length, record.method) == ("news", "alice", True, 3, "prefix")
    assert record.fingerprint == pt.models.fingerprint(model) and len(record.sha256) == 64
    assert record.size_bytes == files["f1"].stat().st_size
    files["f1"].unlink()  # the store keeps its own copy
    assert torch.equal(store.load(record).kv["self"], pt.load_prefix(record.file).kv["self"])
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "file" not in record.to_dict()


def test_visibility_and_ownership(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    store.add("mine", "alice", files["f0"])
    store.add("shared", "alice", files["f1"], public=True)
    store.add("mine", "bob", files["f2"])  # names are per owner
    assert [r.name for r in store.list("bob")] == ["mine", "shared"]
    assert store.get("mine", "bob").owner == "bob" and store.get("mine", "alice").owner == "alice"
    with pytest.raises(PrefixNotFound):
        store.get("mine", "carol")  # private to others: as if it did not exist
    assert store.get("shared", "carol").owner == "alice"
    with pytest.raises(NotOwner):
        store.remove("shared", "bob")
    with pytest.raises(PrefixNotFound):
        store.remove("mine", "carol")
    with pytest.raises(PrefixExists):
        store.add("shared", "bob", files["f3"], public=True)  # one public prefix per name
    with pytest.raises(PrefixExists):
        store.add("mine", "alice", files["f3"])
    store.add("shared", "bob", files["f3"])  # a private one of the same name shadows the public one for bob
    assert store.get("shared", "bob").owner == "bob" and store.get("shared", "carol").owner == "alice"
    assert len(store.list()) == 4
    assert [(r.owner, r.public) for r in store.find("shared")] == [("alice", True), ("bob", False)]
    for bad in ("", "a/b", "../x", "-x", "x" * 65):
        with pytest.raises(InvalidName):
            store.add(bad, "alice", files["f0"])


def test_remove_deletes_the_file_and_tells_listeners(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    record = store.add("x", "alice", files["f0"])
    seen = []
    store.on_remove(seen.append)
    store.remove("x", "alice")
    assert not record.file.exists() and [r.id for r in seen] == [record.id]
    with pytest.raises(PrefixNotFound):
        store.get("x", "alice")
    again = store.add("x", "alice", files["f1"])
    assert again.id != record.id  # ids are never reused: a stale cached copy can never match


def test_changed_or_missing_file_is_refused_on_load(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    record = store.add("x", "alice", files["f0"])
    data = bytearray(record.file.read_bytes())
    data[-1] ^= 0xFF
    record.file.write_bytes(bytes(data))
    with pytest.raises(PrefixIntegrityError, match="sha256"):
        store.load(record)
    record.file.unlink()
    with pytest.raises(PrefixIntegrityError, match="missing"):
        store.load(record)


def test_refused_files_leave_nothing_behind(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    other = tiny("gpt2")
    wrong = pt.save_prefix(MergedPrefix(kv={"self": torch.zeros(2, 2, 4, 2, 8)}, meta={}), tmp_path / "gpt2.safetensors",
                           model=other)
    with pytest.raises(PrefixFileError, match="kv_heads"):
        store.add("w", "alice", wrong)
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95")
    with pytest.raises(PrefixFileError, match="pickle"):
        store.add("w", "alice", tmp_path / "pickle.pt")
    assert list(store.files_dir.iterdir()) == [] and store.list() == []


def test_keys_are_random_hashed_and_removable(tmp_path):
    store = PrefixStore(tmp_path / "p.db")
    a1, a2, b = store.add_key("alice"), store.add_key("alice"), store.add_key("bob")
    assert len({a1, a2, b}) == 3 and len(a1) > 40
    assert store.owner_of(a1) == "alice" and store.owner_of(b) == "bob" and store.owner_of("nope") is None
    with sqlite3.connect(store.path) as db:
        stored = [r[0] for r in db.execute("SELECT key_hash FROM api_keys")]
    assert a1 not in stored and all(len(h) == 64 for h in stored)
    assert store.remove_key(a1) and store.owner_of(a1) is None and store.owner_of(a2) == "alice"
    key_id = next(k.key_id for k in store.list_keys("bob"))
    assert store.remove_key(key_id) and store.owner_of(b) is None
    assert not store.remove_key("not-a-key")


def test_many_threads_share_one_store(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)

    def work(i):
        key = store.add_key(f"user{i}")
        store.add(f"n{i}", f"user{i}", files[f"f{i % 4}"], public=(i % 3 == 0))
        assert store.owner_of(key) == f"user{i}"
        assert store.get(f"n{i}", f"user{i}").name == f"n{i}"
        if i % 2:
            store.remove(f"n{i}", f"user{i}")
        return len(store.list(f"user{i}"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(24)))
    assert sorted(r.name for r in store.list()) == sorted(f"n{i}" for i in range(24) if i % 2 == 0)
    assert len(store.list_keys()) == 24


def test_prefix_cache_is_lru_and_forgets_removed_prefixes(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    cache = PrefixCache(store, capacity=2)
    records = [store.add(f"n{i}", "alice", files[f"f{i}"]) for i in range(3)]
    a = cache.get(records[0])
    assert cache.get(records[0]) is a and cache.misses == 1 and cache.hits == 1
    cache.get(records[1])
    cache.get(records[2])  # evicts n0, the least recently used
    assert len(cache) == 2 and cache.get(records[0]) is not a
    b = cache.get(records[2])
    store.remove("n2", "alice")
    assert b.revoked  # requests holding it and not started yet are refused
    with pytest.raises(PrefixNotFound):
        cache.get(records[2])

    loads = []
    slow_store_load = store.load
    store.load = lambda r: (loads.append(r.id), slow_store_load(r))[1]
    cache2 = PrefixCache(store, capacity=4)
    barrier = threading.Barrier(6)

    def get():
        barrier.wait()
        return cache2.get(records[1])

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: get(), range(6)))
    assert len({id(g) for g in got}) == 1 and loads == [records[1].id]  # one read for six concurrent misses


def test_a_load_racing_with_a_remove_is_not_found_not_corrupt(model, files, tmp_path):
    """Another process removed the prefix between our lookup and our read of its file."""
    store = PrefixStore(tmp_path / "p.db", model=model)
    record = store.add("x", "alice", files["f0"])
    PrefixStore(tmp_path / "p.db").remove("x", "alice")  # a second store object: no listener in this one
    with pytest.raises(PrefixNotFound):
        PrefixCache(store).get(record)


def test_loaded_prefix_owns_its_memory(model, files, tmp_path):
    """A loaded prefix is parsed from the bytes that were hashed (no mmap): truncating or rewriting
    the file afterwards changes nothing in memory and cannot crash the process."""
    store = PrefixStore(tmp_path / "p.db", model=model)
    record = store.add("a", "alice", files["f1"])
    loaded = store.load(record)
    want = {k: v.clone() for k, v in pt.load_prefix(files["f1"]).kv.items()}
    with open(record.file, "r+b") as f:
        f.truncate(0)  # what `truncate -s 0` does; with an mmap, reading the tensors would be a bus error
    assert all(torch.equal(loaded.kv[k], want[k]) for k in want)
    with pytest.raises(PrefixIntegrityError, match=r"0 bytes now, sha256 differs"):
        store.load(record)
    record.file.write_bytes(files["f2"].read_bytes())  # another valid prefix, swapped in place
    with pytest.raises(PrefixIntegrityError, match="changed since it was added"):
        store.load(record)


def test_unknown_tensors_are_refused_and_a_wrong_base_model_is_corrected(model, files, tmp_path):
    from safetensors.torch import load, save

    from prefixtune.models import model_name
    from prefixtune.prefix import parse_safetensors

    store = PrefixStore(tmp_path / "p.db", model=model)
    tensors, meta = parse_safetensors(files["f1"].read_bytes(), "f1")
    extra = save({**tensors, "payload": torch.zeros(1000)}, metadata=meta)
    with pytest.raises(PrefixFileError, match=r"tensors the prefix format does not define: \['payload'\]"):
        store.add_bytes("extra", "alice", extra, label="extra.safetensors")
    missing = save({}, metadata=meta)  # metadata lists a kind the file does not hold
    with pytest.raises(PrefixFileError, match="metadata lists kinds"):
        store.add_bytes("missing", "alice", missing)
    assert list(store.files_dir.iterdir()) == []  # refused files are never written
    # the right fingerprint, but metadata claiming another base model: listed under the true one
    liar = save(tensors, metadata={**meta, "base_model": "gpt2-xl"})
    assert load(liar).keys() == tensors.keys()
    notes: list[str] = []
    record = store.add_bytes("liar", "alice", liar, notes=notes)
    assert record.base_model == model_name(model) != "gpt2-xl"
    assert len(notes) == 1 and "gpt2-xl" in notes[0] and model_name(model) in notes[0]


def test_store_is_private_to_its_user(model, files, tmp_path):
    store = PrefixStore(tmp_path / "p.db", model=model)
    record = store.add("a", "alice", files["f1"])
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(store.path) == 0o600 and mode(store.files_dir) == 0o700 and mode(record.file) == 0o600
    for suffix in ("-wal", "-shm"):
        wal = store.path.with_name(store.path.name + suffix)
        assert not wal.exists() or mode(wal) == 0o600
    store.path.chmod(0o644)  # a store made by an older version is tightened on open
    store.files_dir.chmod(0o755)
    PrefixStore(store.path, model=model)
    assert mode(store.path) == 0o600 and mode(store.files_dir) == 0o700


KILLED_WRITER = """
import os, sys, time
from prefixtune.serve import store as st
store = st.PrefixStore(sys.argv[1])
def stuck(*args):  # killed after the temp file is written, before it is renamed into place
    print("written", flush=True)
    time.sleep(60)
st.os.replace = stuck
store.add("x", "alice", sys.argv[2])
"""


def test_kill_9_during_an_add_leaves_nothing_after_reopening(model, files, tmp_path, caplog):
    """A real kill -9 of a process mid-add leaves a temp file; a crash between rename and insert
    leaves a file with no row. Reopening removes both (and says so), but keeps a temp file that a
    live writer still holds, and every indexed file."""
    import fcntl
    import os
    import subprocess
    import sys

    db = tmp_path / "p.db"
    store = PrefixStore(db, model=model)
    kept = store.add("kept", "alice", files["f0"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(db), str(files["f1"])], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.kill()  # SIGKILL
        writer.wait()
    stale = [f for f in store.files_dir.iterdir() if f.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].stat().st_size == files["f1"].stat().st_size
    unindexed = store.files_dir / "0123456789abcdef0123456789abcdef.safetensors"
    unindexed.write_bytes(files["f2"].read_bytes())
    live = store.files_dir / ".add-live.tmp"  # a writer in this process still holds it
    fd = os.open(live, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level("WARNING", logger="prefixtune.serve"):
            reopened = PrefixStore(db, model=model)
    finally:
        os.close(fd)
    assert sorted(reopened.removed_orphans) == sorted([stale[0], unindexed])
    assert sorted(f.name for f in store.files_dir.iterdir()) == sorted([kept.file.name, live.name])
    for f in (stale[0], unindexed):
        assert any(f.name in r.getMessage() and "orphan" in r.getMessage() for r in caplog.records)
    assert torch.equal(reopened.load(reopened.get("kept", "alice")).kv["self"], pt.load_prefix(files["f0"]).kv["self"])
    assert PrefixStore(db, model=model).removed_orphans == [live]  # no writer holds it any more


def test_soft_prompts_are_stored_and_weight_methods_and_infixes_refused(model, tmp_path):
    import prefixtune as pt
    from prefixtune.methods.weights import WeightArtifact

    store = PrefixStore(tmp_path / "p.db", model=model)
    prompt = pt.PromptModel(model, pt.PromptConfig(length=3, init="random"))
    prompt.save(tmp_path / "prompt.safetensors")
    record = store.add("soft", "alice", tmp_path / "prompt.safetensors")
    loaded = store.load(record)
    assert loaded.embeds is not None and loaded.template == [["v", 3], ["s"]]
    weights = WeightArtifact({"lora.x.A": torch.zeros(2, 2)}, {"method": "lora", **prompt.base_meta()})
    weights.save(tmp_path / "lora.safetensors", model=model)
    with pytest.raises(PrefixFileError, match="change the model"):
        store.add("w", "alice", tmp_path / "lora.safetensors")
    pt.InfixModel(model, pt.InfixConfig(length=2)).save(tmp_path / "infix.safetensors")
    with pytest.raises(PrefixFileError, match="infix"):
        store.add("i", "alice", tmp_path / "infix.safetensors")
    assert [r.name for r in store.list()] == ["soft"]
