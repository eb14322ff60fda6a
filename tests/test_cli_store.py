"""`prefixtune keys` and `prefixtune prefixes` against a real store file."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import prefixtune as pt
from prefixtune.cli import app

from conftest import tiny


def test_keys_and_prefixes_commands(tmp_path):
    runner = CliRunner()
    db = tmp_path / "prefixes.db"
    r = runner.invoke(app, ["keys", "add", "alice", "--store", str(db)])
    assert r.exit_code == 0, r.output
    key = r.output.split()[-1]
    from prefixtune.serve import PrefixStore

    assert PrefixStore(db).owner_of(key) == "alice"
    model = tiny("llama")
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(model, pt.PrefixConfig(length=3)).save(path)
    r = runner.invoke(app, ["prefixes", "add", "poems", str(path), "--owner", "alice", "--store", str(db)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["name"] == "poems"
    r = runner.invoke(app, ["prefixes", "list", "--store", str(db)])
    assert "poems" in r.output and "alice" in r.output
    r = runner.invoke(app, ["prefixes", "rm", "poems", "--owner", "bob", "--store", str(db)])
    assert r.exit_code == 2 and "poems" in r.output
    r = runner.invoke(app, ["prefixes", "rm", "poems", "--owner", "alice", "--store", str(db)])
    assert r.exit_code == 0
    assert "poems" not in runner.invoke(app, ["prefixes", "list", "--store", str(db)]).output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not really")
    r = runner.invoke(app, ["prefixes", "add", "bad", str(bad), "--owner", "alice", "--store", str(db)])
    assert r.exit_code == 2 and "bad.safetensors" in r.output
    r = runner.invoke(app, ["keys", "rm", key, "--store", str(db)])
    assert r.exit_code == 0 and PrefixStore(db).owner_of(key) is None


def test_store_migrate_and_copy_commands(tmp_path, postgres):
    """A PostgreSQL store set up from the command line, then copied to SQLite."""
    from prefixtune.serve import PrefixStore
    from prefixtune.serve.store_errors import StoreError

    runner = CliRunner()
    url = postgres.create_database()
    r = runner.invoke(app, ["keys", "add", "alice", "--store", url])
    assert isinstance(r.exception, StoreError) and "--files-dir" in str(r.exception)  # main() prints it, exit 2
    r = runner.invoke(app, ["store", "migrate", url, "--files-dir", str(tmp_path / "shared")])
    assert r.exit_code == 0 and "schema version 0 -> 2" in r.output, r.output
    assert "up to date" in runner.invoke(app, ["store", "migrate", url]).output  # the folder was recorded
    key = runner.invoke(app, ["keys", "add", "alice", "--store", url]).output.split()[-1]
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(tiny("llama"), pt.PrefixConfig(length=3)).save(path)
    r = runner.invoke(app, ["prefixes", "add", "poems", str(path), "--owner", "alice", "--store", url])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "shared" / f"{json.loads(r.output)['sha256']}.safetensors").exists()
    r = runner.invoke(app, ["store", "copy", url, str(tmp_path / "copy.db")])
    assert r.exit_code == 0 and "copied 1 prefixes and 1 API keys" in r.output, r.output
    copy = PrefixStore(tmp_path / "copy.db")
    assert copy.owner_of(key) == "alice" and [p.name for p in copy.list()] == ["poems"]
    r = runner.invoke(app, ["store", "copy", url, str(tmp_path / "copy.db")])
    assert r.exit_code == 2 and "empty store" in r.output
    r = runner.invoke(app, ["store", "migrate", "mysql://root@127.0.0.1/x"])
    assert r.exit_code == 2 and "unknown store URL" in r.output
