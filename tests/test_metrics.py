"""prefixtune.metrics: official known answers, hand-checkable cases, errors and file formats.

Expected values are either the official e2e-metrics output or worked out by hand from
the metric's definition (the arithmetic is in the comments).
"""

import math
from pathlib import Path

import pytest

from prefixtune.metrics import TASKS, format_table, read_hyps, read_refs, score
from prefixtune.metrics.bleu import mteval_bleu, multi_bleu
from prefixtune.metrics.meteor import MeteorProcess
from prefixtune.metrics.nist import BETA, nist, nist_length_penalty
from prefixtune.metrics.ptb import ptb_tokenize
from prefixtune.metrics.ter import ter
from prefixtune.metrics.webnlg import normalize_hypothesis, normalize_reference

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# --- E2E known answer ---------------------------------------------------------------------------

# tuetschek/e2e-metrics measure_scores.py on the E2E dev set, first reference of each MR used
# as the system output and the remaining references as its references.
E2E_DEV_OFFICIAL = {"bleu": 0.6061, "nist": 8.6364, "meteor": 0.4497, "rouge_l": 0.6547, "cider": 1.8943}


def _e2e_dev_first_reference_as_output() -> tuple[list[str], list[list[str]]]:
    by_mr: dict[str, list[str]] = {}  # dicts keep first-appearance order
    for line in (SHARED_DATA / "e2e" / "src1_valid.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            mr, ref = line.split("||", 1)
            by_mr.setdefault(mr.strip(), []).append(ref.strip())
    assert len(by_mr) == 547 and all(len(refs) >= 2 for refs in by_mr.values())
    return [refs[0] for refs in by_mr.values()], [refs[1:] for refs in by_mr.values()]


@pytest.mark.real
def test_e2e_dev_matches_official_e2e_metrics():
    hyps, refs = _e2e_dev_first_reference_as_output()
    got = score("e2e", hyps, refs)
    assert list(got) == list(E2E_DEV_OFFICIAL)
    for key, official in E2E_DEV_OFFICIAL.items():
        tolerance = 0.005 if key in ("nist", "cider") else 0.0005
        assert abs(got[key] - official) <= tolerance, (key, got[key], official)
        # The official script prints 4 decimals; we reproduce them exactly.
        assert round(got[key], 4) == official, (key, got[key], official)


# --- hand-checkable cases -----------------------------------------------------------------------

def test_e2e_empty_hypothesis_scores_by_hand():
    hyps = ["", "the cat sat on the mat ."]
    refs = [["a b c"], ["the cat sat on the mat ."]]
    got = score("e2e", hyps, refs)
    # BLEU: all n-grams of the 7-word output match; the closest references are 3 + 7 words long.
    assert got["bleu"] == pytest.approx(math.exp(1 - 10 / 7))
    # ROUGE-L: 0 for the empty output, 1 for the identical one.
    assert got["rouge_l"] == pytest.approx(0.5)
    # CIDEr-D: 0 and 10 (identical, n-grams in 1 of 2 items so idf > 0); the mean is 5.
    assert got["cider"] == pytest.approx(5.0)
    # NIST over 10 reference words ("the" twice): unigram info log2(10/2) for "the",
    # log2(10) for the other five words; only "the cat" and "the mat" carry bigram info
    # (log2(2/1) each); longer n-grams carry none. 7 output words vs 10 reference words.
    raw = (2 * math.log2(5) + 5 * math.log2(10)) / 7 + 2 / 6
    assert got["nist"] == pytest.approx(raw * math.exp(-BETA * math.log(7 / 10) ** 2))
    assert 0.0 < got["meteor"] < 1.0


def test_bleu_identical_is_one():
    hyps = ["The cat sat on the mat .", "a b c d e"]
    assert mteval_bleu(hyps, [[h] for h in hyps]) == pytest.approx(1.0)
    assert multi_bleu(hyps, [[h] for h in hyps]) == pytest.approx(1.0)


def test_bleu_unequal_reference_counts():
    hyps = ["a b c d", "e f g h"]
    refs = [["a b c d e f g h"], ["x y", "e f g h", "e f g h i j"]]
    # Every n-gram matches; closest reference lengths 8 and 4 for 8 output words. A padded
    # empty reference must not count as a length-0 reference for the first item.
    assert mteval_bleu(hyps, refs) == pytest.approx(math.exp(1 - 12 / 8))


def test_ter_by_hand():
    assert ter(["a b c d"], [["a b c d"]]) == 0.0
    assert ter(["a b c d"], [["a b x d"]]) == pytest.approx(1 / 4)  # one substitution, 4 words
    assert ter(["a b c d"], [["a b x d", "a b c d"]]) == 0.0  # edits against the closest reference
    assert ter([""], [["a b c"]]) == pytest.approx(1.0)  # empty output: 3 deletions / 3 words


def test_nist_by_hand():
    # "a" and "b" each carry log2(2 words / 1) = 1 bit; "a b" carries log2(1/1) = 0.
    assert nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    assert nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert nist(["a"], [["a b c"]]) == pytest.approx(math.log2(3) * nist_length_penalty(1 / 3))


def test_nist_uses_per_item_average_reference_length():
    # Reference lengths: item 0 averages 2, item 1 averages (2 + 6) / 2 = 4, so 4 output words
    # over 6 is a ratio of 2/3 and a penalty of 0.5. Unigram info over 10 reference words:
    # a, b: log2(10); c, d: log2(10/2); bigrams carry none.
    got = nist(["a b", "c d"], [["a b"], ["c d", "c d x y z w"]])
    assert got == pytest.approx(0.5 * (2 * math.log2(10) + 2 * math.log2(5)) / 4)


def test_webnlg_by_hand():
    hyps = ["The cat sat on the mat.", "Alan Bean"]
    refs = [["The cat sat on the mat."], ["Alan Bean was born in Wheeler, Texas."]]
    got = score("webnlg", hyps, refs)
    assert list(got) == ["bleu", "meteor", "ter"]
    # The official reference files pad items with fewer than 3 references with blank lines,
    # which multi-bleu.perl reads as zero-length references: the 2-word output's closest
    # reference length is 0, not 9. Every n-gram matches, so BLEU is 1.
    assert got["bleu"] == pytest.approx(1.0)
    # TER: 0 edits, then 7 deletions against 9 words ("wheeler , texas ." is 4 tokens).
    assert got["ter"] == pytest.approx(7 / 16)
    assert 0.0 < got["meteor"] < 1.0


def test_webnlg_normalization_follows_the_2017_script():
    text = "São Paulo's airport–city (Brazil)."
    assert normalize_hypothesis(text) == "sao paulo ' s airport - city ( brazil ) ."
    assert normalize_reference(text) == "sao paulo ' s airport - city ( brazil ) ."


def test_meteor_identical_and_process_is_reaped():
    with MeteorProcess() as proc:
        corpus, per_item = proc.score(["the cat sat on the mat", ""], [["the cat sat on the mat"], ["a b c"]])
        assert proc.returncode is None  # still running between calls
    assert per_item[0] > 0.99 and per_item[1] == 0.0
    assert 0.0 < corpus < 1.0
    assert proc.returncode is not None  # exited and waited for: no zombie left behind


def test_a_shared_meteor_jvm_scores_each_corpus_as_a_fresh_one_and_starts_once(monkeypatch):
    from prefixtune.metrics import meteor as meteor_module
    from prefixtune.metrics import scorer_ready

    a = (["the cat sat on the mat", "a dog"], [["the cat sat on a mat"], ["the dog barked"]])
    b = (["name is the eagle", "it is a pub"], [["the eagle is a coffee shop"], ["a pub near the river"]])
    fresh = [meteor_module.meteor(*a), meteor_module.meteor(*b)]
    started = []
    real = meteor_module.MeteorProcess

    class Counting(real):
        def __init__(self):
            started.append(1)
            super().__init__()

    monkeypatch.setattr(meteor_module, "MeteorProcess", Counting)
    with scorer_ready("e2e") as proc, scorer_ready("webnlg") as inner:  # nested blocks reuse the outer JVM
        assert inner is proc
        shared = [meteor_module.meteor(*a), meteor_module.meteor(*b), meteor_module.meteor(*a)]
    assert started == [1] and proc.returncode is not None
    assert shared == [fresh[0], fresh[1], fresh[0]]
    with scorer_ready("xsum") as nothing:  # no METEOR in the task: nothing started
        assert nothing is None and started == [1]


def test_ptb_tokenize_keeps_one_line_per_text():
    # Line breaks inside a text must not shift the texts after it; punctuation is dropped.
    assert ptb_tokenize(["Hello,\nWorld!", "", "It's (big)."]) == ["hello world", "", "it 's -lrb- big -rrb-"]


def test_xsum_rouge_by_hand():
    got = score("xsum", ["the cat sat", "dogs bark"], [["the cat ran"], ["cats meow", "dogs bark"]])
    assert list(got) == ["rouge1", "rouge2", "rougeL"]
    # Item 0: 2 of 3 unigrams, 1 of 2 bigrams, LCS 2 of 3. Item 1: the second reference is exact.
    assert got["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["rouge2"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["rougeL"] == pytest.approx((2 / 3 + 1) / 2)


def test_generic_identical():
    hyps = ["The cat sat on the mat.", "Alan Bean was born in Wheeler, Texas."]
    got = score("generic", hyps, [[h] for h in hyps])
    assert got == pytest.approx({"bleu": 1.0, "rouge_l": 1.0, "chrf": 1.0})


# --- errors -------------------------------------------------------------------------------------

def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="got 1 hypotheses but 2 reference lists"):
        score("e2e", ["a"], [["a"], ["b"]])


def test_item_without_references_is_rejected():
    with pytest.raises(ValueError, match="item 1 has no references"):
        score("webnlg", ["a", "b"], [["a"], []])


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task 'e2e_nlg'") as err:
        score("e2e_nlg", ["a"], [["a"]])
    assert all(task in str(err.value) for task in ("e2e", "webnlg", "dart", "xsum", "generic"))
    assert set(TASKS) == {"e2e", "webnlg", "dart", "xsum", "generic", "accuracy"}


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a", None], [["a"], ["b"]], "hypothesis at item 1 is NoneType"),
        (["a", "b"], [["a"], ["b", 3]], "reference 1 at item 1 is int"),
        (["a", "b"], ["a", "b"], "references at item 0 must be a list of strings, got str"),
        ("ab", [["a"], ["b"]], "hyps must be a list of strings"),
        ([], [], "nothing to score"),
    ],
)
def test_malformed_inputs_name_the_item(hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        score("xsum", hyps, refs)


def test_missing_java_raises_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere
    with pytest.raises(RuntimeError, match="`java` was not found"):
        score("e2e", ["a b"], [["a b"]])
    with pytest.raises(RuntimeError, match="java"):
        MeteorProcess()


# --- file formats and table ---------------------------------------------------------------------

def test_read_hyps_and_refs_round_trip(tmp_path):
    hyps = ["first output", "", "third output"]
    refs = [["r1 a", "r1 b"], ["r2 a"], ["r3 a", "r3 b", "r3 c"]]
    hyp_file, ref_file = tmp_path / "hyps.txt", tmp_path / "refs.txt"
    hyp_file.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    ref_file.write_text("\n\n".join("\n".join(item) for item in refs) + "\n\n", encoding="utf-8")
    assert read_hyps(hyp_file) == hyps
    assert read_refs(ref_file) == refs


def test_read_refs_without_blank_lines_is_single_reference(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("one\ntwo\r\nthree", encoding="utf-8")
    assert read_refs(path) == [["one"], ["two"], ["three"]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a\nb\n\n\nc\n", r"refs\.txt:4: blank line right after another blank line"),
        (b"\na\n\nb\n", r"refs\.txt:1: blank line at the start"),
        (b"a\n\xff\xfe\n", r"refs\.txt:2: not valid UTF-8"),
        (b"\n\n", r"refs\.txt: no references"),
    ],
)
def test_read_refs_malformed(tmp_path, content, message):
    path = tmp_path / "refs.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_refs(path)


def test_read_hyps_malformed(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt: empty file"):
        read_hyps(empty)
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"ok\nalso ok\nbad \xc3\n")
    with pytest.raises(ValueError, match=r"broken\.txt:3: not valid UTF-8"):
        read_hyps(broken)


def test_format_table():
    table = format_table({"bleu": 0.60614, "nist": 8.63643, "rouge_l": 0.5})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "score"]
    assert [line.split() for line in lines[2:]] == [["bleu", "0.6061"], ["nist", "8.6364"], ["rouge_l", "0.5000"]]
    assert len({len(line) for line in lines}) == 1  # columns line up
    with pytest.raises(TypeError, match="'bleu' is str"):
        format_table({"bleu": "high"})
    with pytest.raises(ValueError, match="no scores"):
        format_table({})


def test_model_based_metrics_are_skipped_with_a_note_when_unavailable(monkeypatch):
    import importlib.util

    from prefixtune.metrics.model_based import model_based_scores

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bert_score" else real(name, *a))
    scores, notes = model_based_scores(["a b"], [["a b"]])
    assert scores == {} and "BERTScore skipped" in notes[0]


def test_evaluate_starts_meteor_before_decoding_and_scores_in_that_jvm(monkeypatch):
    from prefixtune.data.base import EvalItem
    from prefixtune.decode import DecodeConfig
    from prefixtune.experiments import run as run_module
    from prefixtune.metrics import meteor as meteor_module

    seen = []

    def generate(model, tok, sources, prefix, cfg, **kwargs):
        seen.append(meteor_module._shared.get())  # the JVM is already starting while outputs are made
        return ["the eagle is a pub"] * len(sources)

    monkeypatch.setattr(run_module, "generate_texts", generate)
    items = [EvalItem("name : The Eagle", ["The Eagle is a pub ."]), EvalItem("name : Zizzi", ["Zizzi is a pub ."])]
    result = run_module.evaluate(None, None, None, items, "e2e", DecodeConfig(precision="fp32"))
    assert seen[0] is not None and seen[0].returncode is not None  # started before decoding, closed after
    assert result["scores"] == score("e2e", result["outputs"], [it.references for it in items])
