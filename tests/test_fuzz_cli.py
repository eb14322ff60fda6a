"""Property-based fuzzing of the CLI's argument validation (issue 17).

Hypothesis draws option values for the commands (numbers at and past their edges, text that is not
a number, every Unicode code point a Linux argv can carry, paths that are missing, folders, files
that are not UTF-8, damaged prefix files, places nobody can write) and runs the CLI's entry point
in this process. The property, for every case: exit 0, or exit 2 with exactly one `error: ...` line
and no traceback; the model is never loaded (a case that gets that far passed every check that
comes before the load, and stops there). The number of cases run is printed.
"""

from __future__ import annotations

import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from test_cli_errors import _run, assets  # noqa: F401 (assets is a fixture)

CASES = 400
COUNTS: dict[str, int] = {}
STARTED: list[float] = []  # when the first case ran (not at import: other files may run first)


def elapsed() -> float:
    if not STARTED:
        STARTED.append(time.monotonic())
    return time.monotonic() - STARTED[0]
BUDGET_S = 40.0


class ModelLoaded(BaseException):
    """Raised instead of loading a model: the case passed every check made before the load."""


@pytest.fixture(scope="module")
def paths(assets, tmp_path_factory):  # noqa: F811
    root, model_dir, good = assets
    out = tmp_path_factory.mktemp("fuzz-cli")
    (out / "latin1.txt").write_bytes(b"caf\xe9\n")
    (out / "a-folder").mkdir()
    import prefixtune as pt
    from conftest import tiny

    ok = pt.save_prefix(pt.PrefixModel(tiny("llama"), pt.PrefixConfig(length=2)).export(), out / "ok.safetensors",
                        model=pt.load_model(str(model_dir))[0])
    (out / "truncated.safetensors").write_bytes(ok.read_bytes()[:-9])
    (out / "pickle.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    return {"model": str(model_dir), "data": str(good), "ok": str(ok), "truncated": str(out / "truncated.safetensors"),
            "pickle": str(out / "pickle.pt"), "latin1": str(out / "latin1.txt"), "folder": str(out / "a-folder"),
            "missing": str(out / "no-such-file"), "proc": "/proc/self/nope/x", "out": str(out / "new-out"),
            "tmp": str(out)}


# text a Linux argv can hold: no NUL; undecodable bytes arrive as lone surrogates (surrogateescape)
argv_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12) | \
    st.sampled_from(["\udcff", "\udce9abc", "\u202eabc", "\U0001F600", "-", "--", "--help-me", " ", ""])
ints = st.one_of(st.sampled_from(["0", "-1", "1", "3", "2147483648", str(2**63), str(2**70), "-" + str(2**70), "1.5",
                                  "1e3", "0x10", "abc", "", "nan", "٣"]), st.integers().map(str), argv_text)
floats = st.one_of(st.sampled_from(["0", "-1", "1", "0.5", "1e-9", "1e309", "-1e309", "nan", "inf", "-inf", "abc",
                                    "", "2", "100.5"]), st.floats().map(repr), argv_text)


def path_values(paths, *names):
    return st.one_of(st.sampled_from([paths[n] for n in names]), argv_text)


def commands(paths):
    p = lambda *names: path_values(paths, *names)  # noqa: E731
    files = ("ok", "truncated", "pickle", "latin1", "folder", "missing")
    return {
        "generate": ([], {"--prefix": p(*files), "--model": p("model", "missing", "folder"), "--input": argv_text,
                          "--input-file": p("latin1", "missing", "folder", "data"), "--num-beams": ints,
                          "--max-new-tokens": ints, "--temperature": floats, "--top-p": floats,
                          "--do-sample": None}),
        "evaluate": ([], {"--prefix": p(*files), "--dataset": st.sampled_from(["jsonl", "e2e", "nope"]),
                          "--path": p("data", "latin1", "missing"), "--split": st.sampled_from(["all", "dev", "x"]),
                          "--out": p("out", "proc", "ok", "folder"), "--eval-size": ints, "--train-size": ints,
                          "--seed": ints, "--num-beams": ints, "--max-new-tokens": ints, "--model": p("model")}),
        "train": (["--no-bf16"], {"--model": p("model", "missing"), "--dataset": st.sampled_from(["jsonl", "nope"]),
                                  "--path": p("data", "latin1", "missing", "folder"), "--out": p("out", "proc", "ok"),
                                  "--train-split": st.sampled_from(["all", "train"]),
                                  "--eval-split": st.sampled_from(["all", "dev"]), "--train-size": ints,
                                  "--lr": floats, "--max-steps": ints, "--batch-size": ints, "--seed": ints,
                                  "--length": ints, "--method": st.sampled_from(["prefix", "prompt", "nope"])}),
        "serve": ([], {"--model": p("model", "missing"), "--store": p("latin1", "folder", "missing", "proc"),
                       "--port": ints, "--max-batch-size": ints, "--batch-window-ms": floats, "--max-queue": ints,
                       "--request-timeout": floats, "--prefix-cache-size": ints, "--max-prefix-cache-bytes": ints,
                       "--threads": ints, "--max-batch-tokens": ints, "--max-prompt-tokens": ints,
                       "--store-poll": floats, "--store-sweep": floats}),
        "keys add": ([argv_text], {"--store": p("latin1", "folder", "missing", "proc")}),
        "prefixes add": ([argv_text, p(*files)], {"--owner": argv_text, "--store": p("latin1", "folder", "missing"),
                                                   "--public": None}),
        "score": ([], {"--task": st.sampled_from(["e2e", "generic", "nope"]), "--hyp": p("latin1", "missing", "data"),
                       "--refs": p("latin1", "missing", "data")}),
    }


@st.composite
def invocations(draw, paths):
    table = commands(paths)
    name = draw(st.sampled_from(sorted(table)))
    positional, options = table[name]
    argv = name.split() + [draw(a) if not isinstance(a, str) else a for a in positional]
    for option in draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=6)):
        strategy = options[option]
        argv += [option] if strategy is None else [option, draw(strategy)]
    if name == "serve" and "--store" not in argv:  # never the default prefixes.db in the working folder
        argv += ["--store", paths["missing"]]
    if name in ("keys add", "prefixes add") and "--store" not in argv:
        argv += ["--store", paths["tmp"] + "/fuzz-store.db"]
    return argv


@settings(max_examples=CASES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_cli_arguments(paths, data, monkeypatch):
    argv = data.draw(invocations(paths))
    if elapsed() > BUDGET_S:
        COUNTS["skipped (time budget)"] = COUNTS.get("skipped (time budget)", 0) + 1
        return
    monkeypatch.chdir(paths["tmp"])
    with mock.patch("prefixtune.models.load_model", side_effect=ModelLoaded):
        try:
            r = _run(*argv)
        except ModelLoaded:
            COUNTS["reached the model load"] = COUNTS.get("reached the model load", 0) + 1
            return
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr + r.stdout, (argv, r.stderr[-2000:])
    if r.returncode == 0:
        COUNTS["ran (exit 0)"] = COUNTS.get("ran (exit 0)", 0) + 1
        return
    assert r.returncode == 2, (argv, r.returncode, r.stderr[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr[-1000:])
    COUNTS["refused (one error line)"] = COUNTS.get("refused (one error line)", 0) + 1


def test_fuzz_cli_count(capsys):
    with capsys.disabled():
        print("\nfuzz_cli: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())) +
              f" generated cases in {elapsed():.0f} s")
    assert COUNTS.get("refused (one error line)", 0) >= 50, COUNTS
