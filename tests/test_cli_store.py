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
