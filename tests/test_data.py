"""Tests for prefixtune.data: loaders on the real shared data, formats, errors, sampling, downloads."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from conftest import missing

from prefixtune.data import (
    DATASETS,
    SEEN_CATEGORIES,
    DataError,
    Dataset,
    EvalItem,
    Example,
    download,
    linearize_triples,
    load_dataset,
    low_data_split,
    resolve_data_dir,
)
from prefixtune.data import e2e, xsum

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
real = pytest.mark.real  # needs the real shared data


def require_shared() -> None:
    """Tests on the real data skip on a machine without it, but must run in CI."""
    if not SHARED.is_dir():
        missing(f"shared data not found at {SHARED}")


@pytest.fixture(autouse=True)
def shared_data_check(request):
    if request.node.get_closest_marker("real"):
        require_shared()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may reach the default (network) fetcher."""

    def refuse(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr("prefixtune.data.registry.urllib_fetch", refuse)


@pytest.fixture(scope="module")
def e2e_dev():
    require_shared()
    return load_dataset("e2e", "dev", SHARED)


@pytest.fixture(scope="module")
def webnlg_train():
    require_shared()
    return load_dataset("webnlg", "train", SHARED)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ E2E


@real
def test_e2e_dev_counts_and_first_example(e2e_dev):
    assert (e2e_dev.name, e2e_dev.split) == ("e2e", "dev")
    assert len(e2e_dev) == 4672
    items = e2e_dev.eval_items()
    assert len(items) == 547
    assert sum(len(it.references) for it in items) == 4672
    assert e2e_dev.examples[0] == Example(
        "name : Alimentum | area : city centre | family friendly : no",
        "There is a place in the city centre , Alimentum , that is not family - friendly .",
    )
    assert e2e_dev.info["format"] == "src1"


@real
def test_e2e_src1_sources_are_the_files_mrs_verbatim(e2e_dev):
    raw = [line.split("||")[0] for line in (SHARED / "e2e" / "src1_valid.txt").read_text("utf-8").splitlines()]
    assert [ex.source for ex in e2e_dev.examples] == raw
    assert any(" | Type : coffee shop | " in s for s in e2e_dev.sources())
    assert any("price : £ 20 - 25" in s for s in e2e_dev.sources())


@real
def test_e2e_eval_items_in_first_appearance_order(e2e_dev):
    items = e2e_dev.eval_items()
    assert [it.source for it in items] == list(dict.fromkeys(ex.source for ex in e2e_dev.examples))
    first = items[0]
    assert isinstance(first, EvalItem) and first.meta == {}
    assert first.references[0] == e2e_dev.examples[0].target


@real
def test_e2e_official_csv_normalizes_to_the_src1_string(tmp_path, e2e_dev):
    csv_text = (
        "\ufeffmr,ref\n"
        '"name[Alimentum], area[city centre], familyFriendly[no]","Alimentum is not family-friendly."\n'
        '"name[Aromi], eatType[coffee shop], food[Chinese], customer rating[1 out of 5], area[riverside], '
        'familyFriendly[yes]","Aromi is a coffee shop,\nby the river."\n'
        '"name[The Eagle], priceRange[£20-25], near[Burger King]",The Eagle is moderately priced.\n'
    )
    write(tmp_path / "e2e" / "devset.csv", csv_text)
    ds = load_dataset("e2e", "dev", tmp_path)
    assert ds.info["format"] == "csv"
    assert [ex.source for ex in ds.examples[:2]] == [
        "name : Alimentum | area : city centre | family friendly : no",
        "name : Aromi | Type : coffee shop | food : Chinese | customer rating : 1 out of 5 | area : riverside "
        "| family friendly : yes",
    ]
    # Same MRs in the real src1 file give the same strings.
    real_sources = set(e2e_dev.sources())
    assert ds.examples[0].source in real_sources and ds.examples[1].source in real_sources
    assert ds.examples[1].target == "Aromi is a coffee shop,\nby the river."  # quoted multi-line field
    assert ds.examples[2].source == "name : The Eagle | price : £ 20 - 25 | near : Burger King"


def test_e2e_prefers_src1_and_file_format_option(tmp_path):
    write(tmp_path / "e2e" / "src1_valid.txt", "name : A | food : Thai||A serves Thai food .\n")
    write(tmp_path / "e2e" / "devset.csv", "mr,ref\n\"name[B], food[Thai]\",B serves Thai food.\n")
    assert load_dataset("e2e", "dev", tmp_path).examples == [Example("name : A | food : Thai", "A serves Thai food .")]
    csv_ds = load_dataset("e2e", "valid", tmp_path, file_format="csv")
    assert csv_ds.examples == [Example("name : B | food : Thai", "B serves Thai food.")]
    with pytest.raises(ValueError):
        load_dataset("e2e", "dev", tmp_path, file_format="tsv")


def test_e2e_csv_mr_parsing():
    assert e2e.parse_csv_mr("name[The Eagle], eatType[pub], priceRange[less than £20], familyFriendly[yes]") == [
        ("name", "The Eagle"),
        ("Type", "pub"),
        ("price", "less than £ 20"),
        ("family friendly", "yes"),
    ]
    with pytest.raises(ValueError):
        e2e.parse_csv_mr("name[The Eagle] eatType[pub]")
    with pytest.raises(ValueError):
        e2e.parse_csv_mr("name: The Eagle")


# ------------------------------------------------------------------ WebNLG


@real
def test_webnlg_train_counts(webnlg_train):
    assert webnlg_train.info["entries"] == 6940
    assert webnlg_train.info["lexicalisations"] == 18102  # every <lex>, as counted in the README
    assert len(webnlg_train) == 18025  # comment="good" only (77 are toFix)
    assert len(load_dataset("webnlg", "train", SHARED, include_tofix=True)) == 18102
    assert {m["category"] for m in webnlg_train.meta.values()} == SEEN_CATEGORIES
    assert all(it.meta["seen"] for it in webnlg_train.eval_items())


@real
def test_webnlg_dev_counts():
    dev = load_dataset("webnlg", "dev", SHARED)
    assert dev.info["entries"] == 872
    assert dev.info["lexicalisations"] == 2268
    assert len(dev) == 2258
    assert len(load_dataset("webnlg", "validation", SHARED, include_tofix=True)) == 2268


@real
def test_webnlg_linearization_of_a_real_entry(webnlg_train):
    source = " | Aarhus : leaderName : Jacob_Bundsgaard | Aarhus_Airport : cityServed : Aarhus"
    item = next(it for it in webnlg_train.eval_items() if it.source == source)
    assert item.references == (
        "Aarhus airport serves the city of Aarhus who's leader is Jacob Bundsgaard.",
        "Aarhus airport serves the city of Aarhus where Jacob Bundsgaard is a leader.",
        "Aarhus airport serves the city of Aarhus, it's leader is Jacob Bundsgaard.",
    )
    assert item.meta == {"category": "Airport", "seen": True, "size": 2}
    spaced = load_dataset("webnlg", "train", SHARED, categories=["Airport"], underscores_to_spaces=True)
    assert " | Aarhus : leaderName : Jacob Bundsgaard | Aarhus Airport : cityServed : Aarhus" in spaced.sources()


@real
def test_webnlg_train_loads_fast():
    start = time.perf_counter()
    load_dataset("webnlg", "train", SHARED)
    assert time.perf_counter() - start < 2.0


@real
def test_webnlg_category_hold_out(webnlg_train):
    held_in = load_dataset("webnlg", "train", SHARED, exclude_categories=["Airport", "Food"])
    held_out = load_dataset("webnlg", "train", SHARED, categories=["Airport", "Food"])
    assert {m["category"] for m in held_out.meta.values()} == {"Airport", "Food"}
    assert not {"Airport", "Food"} & {m["category"] for m in held_in.meta.values()}
    assert len(held_in) + len(held_out) == len(webnlg_train)
    assert held_in.info["entries"] + held_out.info["entries"] == 6940
    food = load_dataset("webnlg", "train", SHARED, categories="Food")
    assert food.examples == load_dataset("webnlg", "train", SHARED, categories=["Food"]).examples
    assert {m["category"] for m in food.meta.values()} == {"Food"}
    with pytest.raises(ValueError, match="Airprot"):
        load_dataset("webnlg", "train", SHARED, exclude_categories=["Airprot"])


def test_linearize_triples_variants():
    triples = [("Alan_Bean", "birthPlace", "Wheeler,_Texas"), ("Alan_Bean", "OCCUPATION", "Test_pilot")]
    assert linearize_triples(triples) == " | Alan_Bean : birthPlace : Wheeler,_Texas | Alan_Bean : OCCUPATION : Test_pilot"
    assert (
        linearize_triples(triples, leading_separator=False, lowercase_properties=True, underscores_to_spaces=True)
        == "Alan Bean : birthplace : Wheeler, Texas | Alan Bean : occupation : Test pilot"
    )


WEBNLG_XML = """<?xml version="1.0" ?>
<benchmark>
  <entries>
    <entry category="Artist" eid="Id1" size="1">
      <modifiedtripleset><mtriple>Aaron_Turner | genre | Sludge_metal</mtriple></modifiedtripleset>
      <lex comment="good" lid="Id1">Aaron Turner plays sludge metal.</lex>
      <lex lid="Id2">Aaron Turner is a sludge metal musician.</lex>
      <lex comment="toFix" lid="Id3">aaron turner sludge</lex>
    </entry>
    <entry category="Airport" eid="Id2" size="1">
      <modifiedtripleset><mtriple>Aarhus_Airport | runwayLength | 2776.0</mtriple></modifiedtripleset>
      <lex comment="good" lid="Id1">The runway at Aarhus Airport is 2776 long.</lex>
    </entry>
  </entries>
</benchmark>
"""


def test_webnlg_flat_test_file_and_unseen_meta(tmp_path):
    write(tmp_path / "webnlg2017" / "test" / "testdata_with_lex.xml", WEBNLG_XML)
    ds = load_dataset("webnlg", "test", tmp_path)
    assert ds.examples[:2] == [
        Example(" | Aaron_Turner : genre : Sludge_metal", "Aaron Turner plays sludge metal."),
        Example(" | Aaron_Turner : genre : Sludge_metal", "Aaron Turner is a sludge metal musician."),
    ]
    items = ds.eval_items()
    assert [it.meta["seen"] for it in items] == [False, True]
    assert items[0].meta["category"] == "Artist"
    assert len(load_dataset("webnlg", "test", tmp_path, include_tofix=True)) == 4


# ------------------------------------------------------------------ DART


@real
def test_dart_dev():
    ds = load_dataset("dart", "dev", SHARED)
    assert ds.info["entries"] == 2768
    assert len(ds) == 6980  # annotations
    assert len(ds.eval_items()) == 2721  # distinct linearized triple sets
    assert ds.examples[0] == Example(
        "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina",
        "A school from Mars Hill, North Carolina, joined in 1973.",
    )
    webnlg_style = load_dataset("dart", "dev", SHARED, leading_separator=True, lowercase_properties=False)
    assert webnlg_style.examples[0].source == (
        " | Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, North Carolina"
    )


# ------------------------------------------------------------------ XSum


@real
def test_xsum_sample_and_seeded_splits():
    raw = [json.loads(line) for line in (SHARED / "xsum" / "xsum_validation_1000.jsonl").open(encoding="utf-8")]
    full = load_dataset("xsum", "all", SHARED, keep_empty_documents=True)
    assert len(full) == 1000
    assert full.examples[0] == Example(raw[0]["document"].strip(), raw[0]["summary"].strip())
    everything = load_dataset("xsum", "all", SHARED)
    assert len(everything) == 999 and everything.info["skipped_empty_documents"] == 1

    parts = {s: load_dataset("xsum", s, SHARED, keep_empty_documents=True) for s in ("train", "dev", "test")}
    assert [len(parts[s]) for s in ("train", "dev", "test")] == [800, 100, 100]
    ids = {s: {it.meta["id"] for it in parts[s].eval_items()} for s in parts}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert ids["train"] | ids["dev"] | ids["test"] == {r["id"] for r in raw}
    default = sum(len(load_dataset("xsum", s, SHARED)) for s in ("train", "dev", "test"))
    assert default == 999
    # Deterministic; another seed gives another carve.
    assert load_dataset("xsum", "dev", SHARED).examples == load_dataset("xsum", "dev", SHARED).examples
    assert load_dataset("xsum", "dev", SHARED, split_seed=1).examples != load_dataset("xsum", "dev", SHARED).examples


def test_xsum_carve_proportions():
    parts = xsum.carve(1000, seed=0)
    assert [len(parts[s]) for s in ("train", "dev", "test")] == [800, 100, 100]
    assert sorted(parts["train"] + parts["dev"] + parts["test"]) == list(range(1000))
    assert xsum.carve(1000, seed=0) == parts and xsum.carve(1000, seed=3) != parts


def test_xsum_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not downloadable") as exc:
        load_dataset("xsum", "train", tmp_path, download=True, fetch=lambda url, dest: pytest.fail("fetched"))
    assert str(tmp_path / "xsum" / "xsum_validation_1000.jsonl") in str(exc.value)
    with pytest.raises(FileNotFoundError, match=r"download\('xsum'"):
        load_dataset("xsum", "dev", tmp_path, subset="full")
    with pytest.raises(ValueError):
        load_dataset("xsum", "all", tmp_path, subset="full")


# ------------------------------------------------------------------ generic JSONL


def test_generic_jsonl(tmp_path):
    path = write(
        tmp_path / "mine.jsonl",
        '{"source": "table A", "target": "text A1", "id": 7}\n'
        "\n"
        '{"source": "table B", "target": ["text B1", " text B2 "]}\n'
        '{"source": "table A", "target": "text A2"}\n',
    )
    for ds in (load_dataset("jsonl", "dev", path=path), load_dataset(str(path), "dev"), load_dataset(path)):
        assert [ex.target for ex in ds.examples] == ["text A1", "text B1", "text B2", "text A2"]
    items = load_dataset("jsonl", path=path).eval_items()
    assert items == [
        EvalItem("table A", ("text A1", "text A2")),
        EvalItem("table B", ("text B1", "text B2")),
    ]
    assert items[0].meta == {"id": 7}
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------ malformed files


def assert_data_error(exc_info, path: Path, where: str):
    message = str(exc_info.value)
    assert isinstance(exc_info.value, ValueError)
    assert str(path) in message and where in message, message


@pytest.mark.parametrize(
    "text, where",
    [
        ("name : A||A .\nname : B, no separator\n", ":2:"),
        ("name : A||A .\nname : B||B .||extra\n", ":2:"),
        ("name : A||A .\n\nname : B||   \n", ":3:"),
        ("name A||A .\n", ":1:"),
    ],
)
def test_e2e_src1_errors_name_file_and_line(tmp_path, text, where):
    path = write(tmp_path / "e2e" / "src1_valid.txt", text)
    with pytest.raises(DataError) as exc:
        load_dataset("e2e", "dev", tmp_path)
    assert_data_error(exc, path, where)


@pytest.mark.parametrize(
    "text, where",
    [
        ("mr,ref\n\"name[A], food[Thai]\",ok\n\"name[A] food[Thai]\",bad\n", ":3:"),
        ("mr,ref\n\"name[A]\",ok\n\"name[B]\",\n", ":3:"),
        ("meaning,text\n\"name[A]\",ok\n", ":1:"),
        ("mr,ref\n\"name[A]\",ok,extra\n", ":2:"),
    ],
)
def test_e2e_csv_errors_name_file_and_line(tmp_path, text, where):
    path = write(tmp_path / "e2e" / "devset.csv", text)
    with pytest.raises(DataError) as exc:
        load_dataset("e2e", "dev", tmp_path)
    assert_data_error(exc, path, where)


@pytest.mark.parametrize(
    "broken, where",
    [
        (WEBNLG_XML.replace("</entries>", "</entriez>"), ":14:"),
        (WEBNLG_XML.replace("<mtriple>Aarhus_Airport | runwayLength | 2776.0</mtriple>", ""), "entry 1 (eid Id2)"),
        (WEBNLG_XML.replace("Aarhus_Airport | runwayLength | 2776.0", "Aarhus_Airport runwayLength"), "entry 1 (eid Id2)"),
        (WEBNLG_XML.replace("Aaron Turner plays sludge metal.", " "), "entry 0 (eid Id1)"),
        (WEBNLG_XML.replace(' category="Airport"', ""), "entry 1 (eid Id2)"),
    ],
)
def test_webnlg_errors_name_file_and_entry(tmp_path, broken, where):
    path = write(tmp_path / "webnlg2017" / "dev" / "1triples" / "x.xml", broken)
    with pytest.raises(DataError) as exc:
        load_dataset("webnlg", "dev", tmp_path)
    assert_data_error(exc, path, where)


@pytest.mark.parametrize(
    "data, where",
    [
        ('{"tripleset": []}', "expected a JSON list"),
        ('[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": "ok"}]}, {"tripleset": [["a", "b", "c"]]}]', "entry 1"),
        ('[{"tripleset": [["a", "b"]], "annotations": [{"text": "x"}]}]', "entry 0"),
        ('[{"tripleset": [["a", "b", "c"]], "annotations": [{"source": "e2e", "text": "  "}]}]', "entry 0"),
        ('[{"tripleset": [["a", "b", "c"]],\n "annotations": [}]', ":2:"),
    ],
)
def test_dart_errors_name_file_and_entry(tmp_path, data, where):
    path = write(tmp_path / "dart" / "dart-v1.1.1-full-dev.json", data)
    with pytest.raises(DataError) as exc:
        load_dataset("dart", "dev", tmp_path)
    assert_data_error(exc, path, where)


@pytest.mark.parametrize(
    "text, where",
    [
        ('{"id": "1", "document": "d", "summary": "s"}\n["not", "an", "object"]\n', ":2:"),
        ('{"id": "1", "document": "d", "summary": "s"}\n{"id": "2", "document": "d"}\n', ":2:"),
        ('{"id": "1", "document": "d", "summary": " "}\n', ":1:"),
        ('{"id": "1", "document": "d", "summary": "s"}\n{broken\n', ":2:"),
    ],
)
def test_xsum_errors_name_file_and_line(tmp_path, text, where):
    path = write(tmp_path / "xsum" / "xsum_validation_1000.jsonl", text)
    with pytest.raises(DataError) as exc:
        load_dataset("xsum", "all", tmp_path)
    assert_data_error(exc, path, where)


@pytest.mark.parametrize(
    "text, where",
    [
        ('{"source": "a", "target": "b"}\n"just a string"\n', ":2:"),
        ('{"source": "a", "target": ""}\n', ":1:"),
        ('{"source": "a", "target": []}\n', ":1:"),
        ('{"source": "a", "target": ["x", 3]}\n', ":1:"),
        ('{"target": "b"}\n', ":1:"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, text, where):
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(DataError) as exc:
        load_dataset(path)
    assert_data_error(exc, path, where)


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("e2e", "train", tmp_path)
    message = str(exc.value)
    assert str(tmp_path / "e2e" / "src1_train.txt") in message
    assert str(tmp_path / "e2e" / "trainset.csv") in message
    assert "download('e2e'" in message and "PREFIXTUNE_DATA" in message and "--data-dir" in message


# ------------------------------------------------------------------ low-data sampling


@real
@pytest.mark.parametrize("n", [50, 100, 200, 500])
def test_low_data_split_sizes_and_disjointness(e2e_dev, n):
    train, held_out = low_data_split(e2e_dev, n, seed=0)
    assert len(train) == n
    train_sources, held_sources = set(train.sources()), set(held_out.sources())
    assert not train_sources & held_sources
    assert train_sources | held_sources == set(e2e_dev.sources())
    # held_out keeps every pair of its sources, in dataset order.
    assert held_out.examples == [ex for ex in e2e_dev.examples if ex.source in held_sources]
    # Grouped by source: at most one sampled source is only partly used.
    full_counts = {it.source: len(it.references) for it in e2e_dev.eval_items()}
    partial = [it.source for it in train.eval_items() if len(it.references) < full_counts[it.source]]
    assert len(partial) <= 1
    assert train.info["low_data"]["n"] == n


@real
def test_low_data_split_is_deterministic_and_seed_dependent(e2e_dev):
    a, a_held = low_data_split(e2e_dev, 100, seed=0)
    b, b_held = low_data_split(e2e_dev, 100, seed=0)
    assert a.examples == b.examples and a_held.examples == b_held.examples
    c, _ = low_data_split(e2e_dev, 100, seed=1)
    assert set(c.sources()) != set(a.sources())


def test_low_data_split_truncates_the_last_group():
    examples = [Example(s, f"{s}{i}") for s, k in (("a", 3), ("b", 3), ("c", 3)) for i in range(k)]
    ds = Dataset("toy", "dev", examples, meta={"a": {"x": 1}})
    for seed in range(5):
        train, held_out = low_data_split(ds, 4, seed=seed)
        assert len(train) == 4
        assert len(set(train.sources())) == 2  # one full group of 3, then 1 of the next
        assert len(held_out) == 3 and len(set(held_out.sources())) == 1
        assert not set(train.sources()) & set(held_out.sources())
    with pytest.raises(ValueError):
        low_data_split(ds, 10)
    with pytest.raises(ValueError):
        low_data_split(ds, 0)


# ------------------------------------------------------------------ registry and data folder


def test_registry_and_options():
    assert {"e2e", "webnlg", "dart", "xsum", "jsonl"} <= set(DATASETS)
    assert DATASETS["webnlg"].options() == {
        "categories": None,
        "exclude_categories": None,
        "include_tofix": False,
        "underscores_to_spaces": False,
    }
    assert DATASETS["dart"].options()["lowercase_properties"] is True
    for name in ("e2e", "webnlg", "dart", "xsum"):
        assert DATASETS[name].urls and all(u.startswith("https://") for u in DATASETS[name].urls)
    assert any("tuetschek/e2e-dataset" in u for u in DATASETS["e2e"].urls)
    assert any("Yale-LILY/dart" in u for u in DATASETS["dart"].urls)
    assert any("EdinburghNLP/xsum" in u for u in DATASETS["xsum"].urls)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("wikibio")
    with pytest.raises(ValueError, match="splits"):
        load_dataset("e2e", "holdout")
    with pytest.raises(ValueError, match="no official download"):
        download("jsonl")


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir() == tmp_path / "cache" / "prefixtune" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "prefixtune" / "data"
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    write(tmp_path / "env" / "e2e" / "src1_valid.txt", "name : A||A .\n")
    assert len(load_dataset("e2e", "dev")) == 1


# ------------------------------------------------------------------ downloads (fake fetcher)


class FakeFetch:
    """Serves bytes by URL; records the URLs asked for; can fail mid-download."""

    def __init__(self, files: dict[str, bytes], fail_on: str | None = None):
        self.files, self.fail_on, self.calls = files, fail_on, []

    def __call__(self, url: str, dest: Path) -> None:
        self.calls.append(url)
        content = self.files[url]
        with open(dest, "wb") as f:
            f.write(content[: len(content) // 2])
            if url == self.fail_on:
                raise ConnectionError("connection reset")
            f.write(content[len(content) // 2:])


def e2e_url(name: str) -> str:
    return next(u for u in DATASETS["e2e"].urls if u.endswith("/" + name))


E2E_CSV = 'mr,ref\n"name[The Eagle], eatType[coffee shop]",The Eagle is a coffee shop.\n'.encode()


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_download_places_official_files(tmp_path):
    fetch = FakeFetch({e2e_url(n): E2E_CSV for n in ("trainset.csv", "devset.csv", "testset_w_refs.csv")})
    ds = load_dataset("e2e", "dev", tmp_path, download=True, fetch=fetch)
    assert fetch.calls == [e2e_url("devset.csv")]  # only the split asked for
    assert ds.examples == [Example("name : The Eagle | Type : coffee shop", "The Eagle is a coffee shop.")]
    assert (tmp_path / "e2e" / "devset.csv").read_bytes() == E2E_CSV
    assert leftovers(tmp_path) == ["e2e", "e2e/devset.csv"]

    assert download("e2e", tmp_path, fetch=fetch) == tmp_path
    assert sorted(fetch.calls) == sorted([e2e_url("devset.csv"), e2e_url("trainset.csv"), e2e_url("testset_w_refs.csv")])
    download("e2e", tmp_path, fetch=fetch)  # already there: nothing fetched
    assert len(fetch.calls) == 3
    download("e2e", tmp_path, splits=["validation"], fetch=fetch, force=True)
    assert fetch.calls[-1] == e2e_url("devset.csv") and len(fetch.calls) == 4


def test_download_is_atomic_when_the_fetch_fails(tmp_path):
    fetch = FakeFetch({e2e_url("devset.csv"): E2E_CSV}, fail_on=e2e_url("devset.csv"))
    with pytest.raises(ConnectionError):
        download("e2e", tmp_path, splits=["dev"], fetch=fetch)
    assert not (tmp_path / "e2e" / "devset.csv").exists()
    assert leftovers(tmp_path) == ["e2e"]  # no partial or temporary file
    with pytest.raises(ConnectionError):
        load_dataset("e2e", "dev", tmp_path, download=True, fetch=fetch)
    assert leftovers(tmp_path) == ["e2e"]

    # A forced re-download that fails leaves the existing file as it was.
    write(tmp_path / "e2e" / "devset.csv", "mr,ref\n\"name[Old]\",Old.\n")
    with pytest.raises(ConnectionError):
        download("e2e", tmp_path, splits=["dev"], fetch=fetch, force=True)
    assert load_dataset("e2e", "dev", tmp_path).examples == [Example("name : Old", "Old.")]
    assert leftovers(tmp_path) == ["e2e", "e2e/devset.csv"]


def webnlg_zip(with_folder: bool = True) -> bytes:
    buf = io.BytesIO()
    top = "webnlg-dataset-master-webnlg_challenge_2017/" + ("webnlg_challenge_2017/" if with_folder else "other/")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(top + "train/1triples/1triple_allSolutions_Artist_train_challenge.xml", WEBNLG_XML)
        zf.writestr(top + "dev/1triples/1triple_allSolutions_Artist_dev_challenge.xml", WEBNLG_XML)
        zf.writestr(top + "test/testdata_with_lex.xml", WEBNLG_XML)
    return buf.getvalue()


def test_download_webnlg_archive(tmp_path):
    (url,) = DATASETS["webnlg"].urls
    download("webnlg", tmp_path, fetch=FakeFetch({url: webnlg_zip()}))
    assert len(load_dataset("webnlg", "train", tmp_path)) == 3
    assert len(load_dataset("webnlg", "test", tmp_path)) == 3
    assert not [p for p in leftovers(tmp_path) if ".part" in p]

    # A broken archive fails without touching what is there, even with force=True.
    with pytest.raises(OSError, match="webnlg_challenge_2017"):
        download("webnlg", tmp_path, fetch=FakeFetch({url: webnlg_zip(with_folder=False)}), force=True)
    assert len(load_dataset("webnlg", "dev", tmp_path)) == 3
    assert not [p for p in leftovers(tmp_path) if ".part" in p]

    # force=True replaces a whole folder.
    smaller = WEBNLG_XML.replace('<lex lid="Id2">Aaron Turner is a sludge metal musician.</lex>', "")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "dev"):
            zf.writestr(f"x/webnlg_challenge_2017/{split}/1triples/a.xml", smaller)
    download("webnlg", tmp_path, fetch=FakeFetch({url: buf.getvalue()}), force=True)
    assert len(load_dataset("webnlg", "train", tmp_path)) == 2
    assert not (tmp_path / "webnlg2017" / "test").exists()


def summary_file(url: str, title: str, first: str, body: str) -> bytes:
    return (
        f"[SN]URL[SN]\n{url}\n\n[SN]TITLE[SN]\n{title}\n\n[SN]FIRST-SENTENCE[SN]\n{first}\n\n"
        f"[SN]RESTBODY[SN]\n{body}\nShare this with\nEmail\n"
    ).encode()


def test_download_xsum_builds_official_splits(tmp_path):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for doc_id in ("101", "102", "103", "104"):
            data = summary_file(f"http://bbc/{doc_id}", "T", f"Summary {doc_id}.", f"Body {doc_id} line 1.\nLine 2.")
            info = tarfile.TarInfo(f"bbc-summary-data/{doc_id}.summary")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    split_ids = json.dumps({"train": ["101", "102"], "validation": [103], "test": ["104", "999"]}).encode()
    fetch = FakeFetch({xsum.ARCHIVE_URL: archive.getvalue(), xsum.SPLITS_URL: split_ids})
    ds = load_dataset("xsum", "train", tmp_path, subset="full", download=True, fetch=fetch)
    assert ds.examples == [
        Example("Body 101 line 1.\nLine 2.", "Summary 101."),
        Example("Body 102 line 1.\nLine 2.", "Summary 102."),
    ]
    assert [ex.target for ex in load_dataset("xsum", "dev", tmp_path, subset="full")] == ["Summary 103."]
    assert [ex.target for ex in load_dataset("xsum", "test", tmp_path, subset="full")] == ["Summary 104."]
    assert sorted(fetch.calls) == sorted([xsum.ARCHIVE_URL, xsum.SPLITS_URL])


def test_xsum_summary_file_parsing():
    document, summary = xsum.parse_summary_file(summary_file("u", "t", "The gist.", "Para 1.\n\nPara 2.").decode())
    assert (document, summary) == ("Para 1.\nPara 2.", "The gist.")
    with pytest.raises(ValueError):
        xsum.parse_summary_file("no sections here")
