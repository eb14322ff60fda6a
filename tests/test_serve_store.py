"""The prefix store (index + managed files + API keys) and the in-memory prefix cache.

Every test taking `open_store` runs twice: on SQLite, and on PostgreSQL (a throwaway cluster on
127.0.0.1, a fresh database per test), so both backends pass the same suite.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix
from prefixtune.files import PrefixFileError
from prefixtune.serve.prefix_cache import PrefixCache
from prefixtune.serve import store_sql
from prefixtune.serve.store import PrefixStore, open_backend
from prefixtune.serve.store_errors import (InvalidName, NotOwner, PrefixExists, PrefixIntegrityError, PrefixNotFound,
                                           StoreError)

from conftest import tiny


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """`open_store(model=None)`: a new store object on this test's store (the same data every call)."""
    if request.param == "sqlite":
        location, files_dir = tmp_path / "db" / "prefixes.db", None
    else:
        location, files_dir = request.getfixturevalue("postgres").create_database(), tmp_path / "shared-files"
    opened = []

    def open_(model=None, **kw):
        opened.append(PrefixStore(location, model=model, files_dir=files_dir, **kw))
        return opened[-1]

    open_.location, open_.files_dir = location, files_dir
    yield open_
    for store in opened:
        store.close()


def stored_files(store) -> list[str]:
    return sorted(p.name for p in store.files_dir.iterdir() if p.name != store_sql.MARKER)


def rows(store, sql: str, params=()) -> list:
    with store._connect() as db:
        return [dict(r) for r in db.execute(sql, params).fetchall()]


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


def test_add_copies_checks_and_records(model, files, open_store):
    store = open_store(model)
    record = store.add("news", "alice", files["f1"], public=True)
    assert record.file.parent == store.files_dir and record.file.read_bytes() == files["f1"].read_bytes()
    assert record.file.name == f"{record.sha256}.safetensors"  # named by content
    assert (record.name, record.owner, record.public, record.length, record.method) == ("news", "alice", True, 3, "prefix")
    assert record.fingerprint == pt.models.fingerprint(model) and len(record.sha256) == 64
    assert record.size_bytes == files["f1"].stat().st_size
    files["f1"].unlink()  # the store keeps its own copy
    assert torch.equal(store.load(record).kv["self"], pt.load_prefix(record.file).kv["self"])
    assert "file" not in record.to_dict()
    assert store.migrated[1] == store_sql.SCHEMA_VERSION and open_store().migrated == (2, 2)


def test_sqlite_defaults(tmp_path):
    store = PrefixStore(tmp_path / "db" / "prefixes.db")
    assert store.files_dir == tmp_path / "db" / "prefixes-files" and store.files_dir.is_dir()
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_visibility_and_ownership(model, files, open_store, tmp_path):
    store = open_store(model)
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


def test_remove_deletes_the_file_and_tells_listeners(model, files, open_store, tmp_path):
    store = open_store(model)
    record = store.add("x", "alice", files["f0"])
    seen = []
    store.on_remove(seen.append)
    store.remove("x", "alice")
    assert not record.file.exists() and [r.id for r in seen] == [record.id]
    with pytest.raises(PrefixNotFound):
        store.get("x", "alice")
    again = store.add("x", "alice", files["f1"])
    assert again.id != record.id  # ids are never reused: a stale cached copy can never match


def test_changed_or_missing_file_is_refused_on_load(model, files, open_store, tmp_path):
    store = open_store(model)
    record = store.add("x", "alice", files["f0"])
    data = bytearray(record.file.read_bytes())
    data[-1] ^= 0xFF
    record.file.write_bytes(bytes(data))
    with pytest.raises(PrefixIntegrityError, match="sha256"):
        store.load(record)
    record.file.unlink()
    with pytest.raises(PrefixIntegrityError, match="missing"):
        store.load(record)


def test_refused_files_leave_nothing_behind(model, files, open_store, tmp_path):
    store = open_store(model)
    other = tiny("gpt2")
    wrong = pt.save_prefix(MergedPrefix(kv={"self": torch.zeros(2, 2, 4, 2, 8)}, meta={}), tmp_path / "gpt2.safetensors",
                           model=other)
    with pytest.raises(PrefixFileError, match="kv_heads"):
        store.add("w", "alice", wrong)
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95")
    with pytest.raises(PrefixFileError, match="pickle"):
        store.add("w", "alice", tmp_path / "pickle.pt")
    assert stored_files(store) == [] and store.list() == []


def test_keys_are_random_hashed_and_removable(open_store):
    store = open_store()
    a1, a2, b = store.add_key("alice"), store.add_key("alice"), store.add_key("bob")
    assert len({a1, a2, b}) == 3 and len(a1) > 40
    assert store.owner_of(a1) == "alice" and store.owner_of(b) == "bob" and store.owner_of("nope") is None
    stored = [r["key_hash"] for r in rows(store, "SELECT key_hash FROM api_keys")]
    assert a1 not in stored and all(len(h) == 64 for h in stored)
    assert store.remove_key(a1) and store.owner_of(a1) is None and store.owner_of(a2) == "alice"
    key_id = next(k.key_id for k in store.list_keys("bob"))
    assert store.remove_key(key_id) and store.owner_of(b) is None
    assert not store.remove_key("not-a-key")


def test_many_threads_share_one_store(model, files, open_store, tmp_path):
    store = open_store(model)

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


def test_prefix_cache_is_lru_and_forgets_removed_prefixes(model, files, open_store, tmp_path):
    store = open_store(model)
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


def test_a_load_racing_with_a_remove_is_not_found_not_corrupt(model, files, open_store, tmp_path):
    """Another process removed the prefix between our lookup and our read of its file."""
    store = open_store(model)
    record = store.add("x", "alice", files["f0"])
    open_store().remove("x", "alice")  # a second store object (another replica): no listener in this one
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
    assert [f.name for f in store.files_dir.iterdir() if f.name != ".prefixtune-store"] == []  # refused: never written
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
    assert sorted(f.name for f in store.files_dir.iterdir() if f.name != ".prefixtune-store") == sorted([kept.file.name, live.name])
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

# -- content-named files, crashes, migrations (both backends) ------------------------------------

def test_same_content_shares_one_file_until_its_last_row_goes(model, files, open_store):
    store = open_store(model)
    a = store.add("a", "alice", files["f0"])
    b = store.add("b", "bob", files["f0"], public=True)
    assert a.file == b.file and stored_files(store) == [a.file.name]
    store.remove("a", "alice")
    assert b.file.exists() and torch.equal(store.load(b).kv["self"], pt.load_prefix(files["f0"]).kv["self"])
    store.remove("b", "bob")
    assert stored_files(store) == []


def test_a_crash_mid_upload_leaves_a_file_that_the_next_open_sweeps(model, files, open_store, tmp_path):
    """A real crash: a child process dies (os._exit) after writing the file, before its row commits."""
    import subprocess
    import sys
    import textwrap

    store = open_store(model)
    keep = store.add("keep", "alice", files["f0"])
    code = textwrap.dedent(f"""
        import os, sys
        from prefixtune.serve.store import PrefixStore
        store = PrefixStore({str(open_store.location)!r}, files_dir={open_store.files_dir and str(open_store.files_dir)!r})
        real_replace = os.replace
        def crash(src, dst):  # the file is in place, its row not yet committed
            real_replace(src, dst)
            print(os.path.basename(dst), flush=True)
            os._exit(9)
        os.replace = crash
        store.add("crash", "alice", {str(files["f1"])!r})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr
    orphan = out.stdout.strip()
    assert orphan in stored_files(store) and [r.name for r in store.list()] == ["keep"]  # a file, no row
    # Leftovers of every kind a crash can leave; files of other programs are not touched.
    sha = "ab" * 32
    for name in (f".{sha}.safetensors.x1y2.tmp", f"{'cd' * 16}.safetensors", "notes.txt"):
        (store.files_dir / name).write_bytes(b"junk")
    again = open_store(model)  # a replica starting: migrations, then the sweep
    assert stored_files(again) == sorted([keep.file.name, "notes.txt"])
    assert again.add("crash", "alice", files["f1"]).name == "crash"  # the name was never taken


def test_migrates_a_schema_1_store(model, files, open_store):
    """A store written by the previous release (random file names, schema 1) opens as schema 2."""
    backend, files_dir = open_backend(open_store.location, open_store.files_dir)
    files_dir.mkdir(parents=True, exist_ok=True)
    data = files["f2"].read_bytes()
    (files_dir / ("0123abcd" * 4 + ".safetensors")).write_bytes(data)
    with backend.write() as db:
        for sql in store_sql.statements(backend.schema_1):
            db.execute(sql)
        db.execute("CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO store_meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO prefixes (name, owner, public, fingerprint, base_model, method, length, size_bytes, "
                   "sha256, file, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   ("old", "alice", 0, pt.models.fingerprint(model), "tiny", "prefix", 4, len(data),
                    __import__("hashlib").sha256(data).hexdigest(), "0123abcd" * 4 + ".safetensors", "2026-01-01T00:00:00Z"))
        db.execute("INSERT INTO api_keys VALUES (?,?,?)", (store_sql.__name__, "alice", "2026-01-01T00:00:00Z"))
    backend.close()
    store = open_store(model)
    assert store.migrated == (1, 2)
    record = store.get("old", "alice")
    assert record.file.name == f"{record.sha256}.safetensors" and stored_files(store) == [record.file.name]
    assert torch.equal(store.load(record).kv["self"], pt.load_prefix(files["f2"]).kv["self"])
    assert store.add("new", "alice", files["f3"]).id > record.id


def test_refuses_a_newer_schema_and_another_stores_files(open_store, tmp_path):
    store = open_store()
    with store._write() as db:
        db.execute("UPDATE store_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer than this prefixtune"):
        open_store()
    with store._write() as db:
        db.execute("UPDATE store_meta SET value='2' WHERE key='schema_version'")
    (store.files_dir / store_sql.MARKER).write_text("someone-else\n")
    with pytest.raises(StoreError, match="files of another store"):
        open_store()


def test_two_replicas_racing_on_the_same_names_and_content(model, files, open_store):
    """Adds and removes of one content by several owners through two store objects: every row
    keeps its file, and no file outlives its rows."""
    a, b = open_store(model), open_store(model)
    data = files["f0"].read_bytes()
    outcomes = []

    def work(i):
        store, owner = (a, b)[i % 2], f"u{i % 4}"
        for _ in range(6):
            try:
                store.add_bytes("p", owner, data)
                outcomes.append("added")
            except PrefixExists:
                outcomes.append("exists")
            try:
                store.remove("p", owner)
            except PrefixNotFound:
                pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert "added" in outcomes
    left = a.list()
    for record in left:
        assert a.load(record).length == 2
    assert stored_files(a) == sorted({r.file.name for r in left})


def test_other_replicas_changes_reach_the_cache(model, files, open_store):
    a, b = open_store(model), open_store(model)
    cache = PrefixCache(a)
    record = a.add("x", "alice", files["f0"])
    entry = cache.get(record)
    if a.backend.pushes_changes:  # PostgreSQL: LISTEN, then hear b's commit
        assert a.wait_for_change(0.1)  # the listener connects: reported as a possible change
        assert not a.wait_for_change(0.05)
        b.remove("x", "alice")
        started = time.monotonic()
        assert a.wait_for_change(5.0) and time.monotonic() - started < 1.0
    else:  # SQLite: no push; the server's watcher re-checks every store_poll_s
        assert not a.wait_for_change(0.01)
        b.remove("x", "alice")
    assert not entry.revoked and cache.resync() == [record.id] and entry.revoked
    with pytest.raises(PrefixNotFound):
        cache.get(record)

    # An entry whose id now names other content (a store copied over another) is not served.
    y = a.add("y", "alice", files["f1"])
    first = cache.get(y)
    z = a.add("z", "alice", files["f2"])
    import dataclasses
    swapped = dataclasses.replace(y, sha256=z.sha256, file=z.file)
    again = cache.get(swapped)
    assert again is not first and first.revoked and again.prefix.length == 4


def test_an_upload_under_way_is_not_swept(model, files, postgres, tmp_path):
    """PostgreSQL: the sweep skips a content whose lock an uncommitted upload holds (on any replica)."""
    url = postgres.create_database()
    store = PrefixStore(url, model=model, files_dir=tmp_path / "files")
    sha = "ef" * 32
    with store._write() as db:  # an upload between writing its file and committing its row
        store.backend.lock_content(db, sha)
        (store.files_dir / f"{sha}.safetensors").write_bytes(b"half-way")
        assert store.sweep() == [] and f"{sha}.safetensors" in stored_files(store)
    assert store.sweep() == [f"{sha}.safetensors"]  # its row never came: now it is an orphan
    store.close()


def test_copy_between_sqlite_and_postgresql(model, files, postgres, tmp_path):
    src = PrefixStore(tmp_path / "a.db", model=model)
    keys = [src.add_key("alice"), src.add_key("bob")]
    for i, (name, owner, f, public) in enumerate([("n0", "alice", "f0", False), ("gone", "alice", "f1", False),
                                                   ("n1", "bob", "f0", True), ("n2", "bob", "f2", False)]):
        src.add(name, owner, files[f], public=public)
    src.remove("gone", "alice")  # a gap in the ids
    pg = PrefixStore(postgres.create_database(), model=model, files_dir=tmp_path / "pg-files")
    assert store_sql.copy_store(src, pg) == (3, 2)
    back = PrefixStore(tmp_path / "b.db", model=model)
    assert store_sql.copy_store(pg, back) == (3, 2)
    for dst in (pg, back):
        assert [r.to_dict() for r in dst.list()] == [r.to_dict() for r in src.list()]  # ids, owners, hashes...
        assert [dst.owner_of(k) for k in keys] == ["alice", "bob"]
        assert all(dst.load(r).length == s.length for r, s in zip(dst.list(), src.list()))
        assert stored_files(dst) == sorted({r.file.name for r in src.list()})
        assert dst.add("later", "carol", files["f3"]).id > max(r.id for r in src.list())
    with pytest.raises(StoreError, match="empty store"):
        store_sql.copy_store(src, pg)
    src.get("n2", "bob").file.write_bytes(b"changed")
    fresh = PrefixStore(postgres.create_database(), files_dir=tmp_path / "pg2-files")
    with pytest.raises(PrefixIntegrityError, match="nothing was copied"):
        store_sql.copy_store(src, fresh)
    assert fresh.list() == [] and fresh.list_keys() == [] and stored_files(fresh) == []
    pg.close()
    fresh.close()


def test_a_delete_cannot_take_the_file_of_an_upload_not_yet_committed(model, files, open_store):
    """Replica B deletes the last row of a content while replica A is between writing that same
    content's file and committing its row: B must wait for A's content lock, then keep the file."""
    a, b = open_store(model), open_store(model)
    b.add("old", "bob", files["f0"])
    entered, go = threading.Event(), threading.Event()
    lock_content = a.backend.lock_content

    def paused_lock(db, sha256):  # A holds the content lock, its file written, its row not committed
        lock_content(db, sha256)
        entered.set()
        go.wait(10)

    a.backend.lock_content = paused_lock
    with ThreadPoolExecutor(2) as pool:
        upload = pool.submit(a.add, "new", "alice", files["f0"])
        assert entered.wait(30)
        delete = pool.submit(b.remove, "old", "bob")
        time.sleep(0.5)
        assert not delete.done()  # waiting for the content lock (SQLite: the write lock)
        go.set()
        record, _ = upload.result(30), delete.result(30)
    assert a.load(record).length == 2 and stored_files(a) == [record.file.name]
