"""Every ordinary CLI mistake: one `error:` line on stderr, exit 2, no traceback, no file changed, and
names/paths/data checked before the (slow) model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import reversal_pairs, tiny, tiny_tokenizer

MODEL_LOADED = "trainable parameters"  # printed by `train` once the model is loaded


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    model_dir = root / "tiny-llama"
    tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer("llama").save_pretrained(model_dir)
    good = root / "pairs.jsonl"
    good.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in reversal_pairs(60)))
    bad_utf8 = root / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"source": "caf\xe9", "target": "x"}\n')
    (root / "e2e-empty" / "e2e").mkdir(parents=True)
    (root / "e2e-empty" / "e2e" / "src1_valid.txt").write_text("")
    (root / "a-file").write_text("not a folder")
    (root / "inputs-latin1.txt").write_bytes(b"caf\xe9\n")
    import prefixtune as pt

    model = tiny("llama")
    nameless = pt.PrefixModel(model, pt.PrefixConfig(length=2)).export()
    nameless.meta.pop("base_model", None)
    pt.save_prefix(nameless, root / "nameless.safetensors")
    (root / "eval-out-file").write_text("keep me")
    return root, model_dir, good


def _run(*args, cwd=None):
    """The CLI's entry point in this process (fast: no interpreter start, no re-import of torch)."""
    import contextlib
    import io
    from unittest import mock

    from prefixtune.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", ["prefixtune", *map(str, args)]), \
            mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _train(model, data, out, *extra):
    return ["train", "--model", model, "--dataset", "jsonl", "--path", data, "--train-split", "all", "--eval-split",
            "all", "--train-size", 30, "--out", out, "--max-steps", 2, "--batch-size", 4, "--length", 2, *extra]


def _without(args: list, option: str) -> list:
    i = args.index(option)
    return args[:i] + args[i + 2:]


CASES = {
    "non-UTF-8 data file": lambda r, m, g: _train(m, r / "latin1.jsonl", r / "o1"),
    "non-UTF-8 --input-file": lambda r, m, g: ["generate", "--model", m, "--input-file", r / "inputs-latin1.txt"],
    "missing --path": lambda r, m, g: ["train", "--model", m, "--dataset", "jsonl", "--out", r / "o2"],
    "empty E2E file": lambda r, m, g: ["train", "--model", m, "--dataset", "e2e", "--data-dir", r / "e2e-empty",
                                       "--train-split", "dev", "--eval-split", "dev", "--train-size", 10, "--out", r / "o3"],
    "--dataset nosuch": lambda r, m, g: ["train", "--model", m, "--dataset", "nosuch", "--out", r / "o4"],
    "--model no-such-model": lambda r, m, g: _train("no-such-model", g, r / "o5"),
    "missing model folder": lambda r, m, g: _train(r / "no-such-folder", g, r / "o6"),
    "--out is a file": lambda r, m, g: _train(m, g, r / "a-file"),
    "--out unwritable": lambda r, m, g: _train(m, g, "/proc/prefixtune-no/run"),
    "prefix file naming no base model": lambda r, m, g: ["generate", "--prefix", r / "nameless.safetensors",
                                                         "--input", "w5"],
    "keys add with a bad owner": lambda r, m, g: ["keys", "add", "bad owner/../x", "--store", r / "keys.db"],
    "evaluate --out is a file": lambda r, m, g: ["evaluate", "--prefix", r / "nameless.safetensors", "--model", m,
                                                 "--dataset", "jsonl", "--path", g, "--split", "all",
                                                 "--out", r / "eval-out-file"],
    "--lr inf": lambda r, m, g: _train(m, g, r / "o7", "--lr", "inf"),
    "unknown method": lambda r, m, g: _train(m, g, r / "o8", "--method", "nosuch"),
    "option of another method": lambda r, m, g: _train(m, g, r / "o9", "--template", "[P] {source}"),
    "a method option out of range": lambda r, m, g: _without(_train(m, g, r / "o10", "--method", "lora", "--rank", "0"),
                                                             "--length"),
}


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_method_option_out_of_range_is_told_with_its_option(assets):
    root, model_dir, good = assets
    r = _run(*CASES["a method option out of range"](root, model_dir, good))
    assert r.stderr.strip() == "error: --rank: LoRAConfig.rank: must be an int >= 1, got 0", r.stderr


def test_bad_data_is_refused_before_the_precision_is_measured(assets):
    # measuring fp32 against bf16 takes seconds on a fresh machine: a mistake in the data should not wait for it
    from unittest import mock

    root, model_dir, _ = assets
    with mock.patch("prefixtune.precision.choose", side_effect=AssertionError("precision measured")):
        r = _run(*_train(model_dir, root / "latin1.jsonl", root / "o11", "--precision", "auto"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "latin1.jsonl" in r.stderr, r.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_gives_one_error_line_and_exit_2(assets, case):
    root, model_dir, good = assets
    before = _snapshot(root)
    r = _run(*CASES[case](root, model_dir, good))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert MODEL_LOADED not in r.stdout  # refused before the model was loaded (or never needed it)
    assert _snapshot(root) == before, "a refused command changed files"


def test_refused_rerun_keeps_run_records(assets, tmp_path):
    _, model_dir, good = assets
    out = tmp_path / "run"
    assert _run(*_train(model_dir, good, out)).returncode == 0
    records = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _run(*_train(model_dir, good, out, "--lr", "0.5"))  # no --resume: refused, nothing rewritten
    assert r.returncode == 2 and "--resume" in r.stderr
    r = _run(*_train(model_dir, good, out, "--lr", "0.5", "--resume"))  # other settings: refused by name
    assert r.returncode == 2 and "lr" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == records
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # valid JSON throughout
    assert log and all("time" in rec for rec in log)


def test_no_java_is_one_error_line_not_a_traceback(tmp_path, monkeypatch):
    hyp, refs = tmp_path / "hyp.txt", tmp_path / "refs.txt"
    hyp.write_text("the eagle is a pub\n")
    refs.write_text("The Eagle is a pub .\n\n")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere
    r = _run("score", "--task", "e2e", "--hyp", hyp, "--refs", refs)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("error:") == 1 and "`java` was not found" in r.stderr and "default-jre-headless" in r.stderr
