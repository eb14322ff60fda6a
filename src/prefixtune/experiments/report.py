"""Every table and figure in the docs, and each experiment folder's table.md and figures, regenerated
from the data committed beside them.

Experiments write their rows, predictions and learning-rate choices under `results/<experiment>/`
(`prefixtune experiment NAME --out results/NAME`); benchmarks write `bench/results/*.json`. A doc
never holds a hand-typed result table: it holds a generated block,

    <!-- generated: experiment results/low-data -->
    ...the table, written by this module...
    <!-- /generated -->

and `prefixtune report` rewrites every block (and redraws every experiment's figures) from those
files. `prefixtune report --check` (and tests/test_report.py) fails when a block differs from what
the data generates, so a number in the docs cannot drift from the files behind it.

Block kinds:
    experiment DIR        the experiment's table (means, std, chosen rates, intervals vs the prefix)
    selection DIR         its learning-rate grid: each point's dev loss, the choice
    bench-ratios GLOB     one column per `make bench` record: every ratio, its goal and whether met
    demo-runs GLOB        one line per `make demo` record (results/demo/*.json): time, machine, metrics
    vision-probe GLOB     the linear probes' table from `experiment probe` folders (probe.json), one line per size
    vision-vpt DIR        `experiment vpt`'s table from DIR/results.jsonl
    vision-l2p DIR        `experiment l2p`'s table from DIR/results.jsonl
    prefix-memory GLOB    serving RSS per loaded prefix, one line per mode of each bench/prefix_memory.py record
    replicas GLOB         one vs two server replicas, one line per round of each bench/bench_replicas.py record
    method-sizes FILE     every method's trainable parameters, artifact values and file size on the real
                          models (scripts/method_sizes.py writes FILE)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

from ..files import atomic_write_bytes
from .catalogue import Experiment
from .executor import SELECTION, read_results
from .figures import draw_dev_curves, draw_figure
from .tables import file_size, partial_choices, report_markdown, selection_markdown, table_markdown

BLOCK = re.compile(r"(<!-- generated: (?P<kind>[\w-]+) (?P<arg>[^>]*?) -->\n)(?P<body>.*?)(<!-- /generated -->)",
                   re.DOTALL)
DOCS = ("README.md", "docs/results.md", "docs/methods.md", "docs/performance.md", "docs/vision.md", "docs/serving.md")


class ReportError(ValueError):
    """A generated block names data that is missing or unreadable."""


def load_experiment(folder: Path):
    """(Experiment, rows, choices) of a results folder, as its command recorded them."""
    meta_path = folder / "experiment.json"
    if not meta_path.exists():
        raise ReportError(f"{meta_path} not found: run `prefixtune experiment ... --out {folder}` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    exp = Experiment(runs=[], **{**meta, "group_by": tuple(meta["group_by"])})
    choice_path = folder / "lr_choice.json"
    choices = json.loads(choice_path.read_text(encoding="utf-8")) if choice_path.exists() else None
    return exp, read_results(folder), choices


def save_experiment_meta(exp: Experiment, out: Path) -> None:
    """What the report needs to redraw this folder's table and figures without the command line. A folder's
    earlier commands stay on record: their sizes and seeds are kept beside this one's (`with_earlier`)."""
    path = Path(out) / "experiment.json"
    if path.exists():
        try:
            exp = exp.with_earlier(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, AttributeError):  # unreadable or not an object: rewritten from this command alone
            pass
    atomic_write_bytes(path, json.dumps(
        {k: v for k, v in dataclasses.asdict(exp).items() if k != "runs"}, indent=2).encode())


def write_outputs(exp: Experiment, out: str | Path, rows: list[dict] | None = None) -> dict:
    """An experiment folder's experiment.json, table.md, figure and dev-loss curves, from its rows
    (default: every row on record in results.jsonl)."""
    out = Path(out)
    rows = read_results(out) if rows is None else rows
    save_experiment_meta(exp, out)
    choice_path = out / "lr_choice.json"
    choices = json.loads(choice_path.read_text()) if choice_path.exists() else None
    table = report_markdown(exp, rows, out, choices)
    atomic_write_bytes(out / "table.md", table.encode())
    fig = draw_figure(exp, rows, out / f"{exp.name}.png")
    curves = draw_dev_curves(out, choices, out / "dev_curves.png") if choices else None
    return {"rows": rows, "table": table, "table_path": out / "table.md", "figure_path": fig, "curves_path": curves}


def _experiment_block(root: Path, arg: str, link) -> str:
    exp, rows, choices = load_experiment(root / arg)
    return table_markdown(exp, rows, root / arg, choices)


def _selection_block(root: Path, arg: str, link) -> str:
    recorded = load_experiment(root / arg)[2] or {}
    # groups whose grid is still running (no choice recorded yet): what has been measured so far
    partial = partial_choices(read_results(root / arg, SELECTION))
    choices = {**recorded, **{g: c for g, c in partial.items() if g not in recorded}}
    if not choices:
        raise ReportError(f"{root / arg}: no learning-rate selection run is recorded")
    return selection_markdown(choices)


def _bench_block(root: Path, arg: str, link) -> str:
    loaded = [(p, _read_json(p)) for p in sorted(glob.glob(str(root / arg)))]
    # `make bench` records only (a soak record lives beside them), full runs only (quick ones mean nothing)
    loaded = [(p, r) for p, r in loaded if "ratios" in r and not r.get("quick")]
    paths, records = [p for p, _ in loaded], [r for _, r in loaded]
    if not records:
        raise ReportError(f"no full `make bench` record matches {arg}")
    names: list[str] = []
    goals: dict[str, str] = {}
    for r in records:
        for ratio in r.get("ratios", []):
            if ratio["name"] not in names:
                names.append(ratio["name"])
            goals.setdefault(ratio["name"], ratio.get("goal") or "")
    head = ["figure", "goal"] + [f"{r['date']} · {r['cpu']} ×{r['cores']} · {r['precision'].split(':')[0]}"
                                 for r in records]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name, goals[name] or "–"]
        for r in records:
            ratio = next((x for x in r.get("ratios", []) if x["name"] == name), None)
            if ratio is None or ratio.get("value") is None:
                cells.append("–")
                continue
            met = {True: " ✓", False: " ✗"}.get(ratio.get("met"), "")
            note = f" ({ratio['note']})" if ratio.get("note") else ""
            cells.append(f"{ratio['value']:g}{met}{note}")
        lines.append("| " + " | ".join(cells) + " |")
    sources = ", ".join(f"[`{Path(p).name}`]({link(p)})" for p in paths)
    return "\n".join(lines) + f"\n\nRecords: {sources}.\n"


def _demo_block(root: Path, arg: str, link) -> str:
    paths = sorted(glob.glob(str(root / arg)))
    if not paths:  # said in the doc, not hidden: the figures appear with the first recorded run
        return f"No `make demo` run is recorded yet (`make demo` writes one file into `{Path(arg).parent}/` per run).\n"
    head = ["date", "CPU", "precision, threads", "load avg", "steps (best) × batch @ lr", "model load s", "training min",
            "total min", "zero-shot BLEU", "prefix BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paths:
        r = _read_json(p)
        s = r["prefix_tuned"]
        lines.append("| " + " | ".join([
            r["date"], f"{r['machine']['cpu']} ×{r['machine']['cpus']}",
            ("bf16" if r.get("bf16") else "fp32") + (f", {r['torch_threads']}" if r.get("torch_threads") else ""),
            "–".join(f"{x:.1f}" for x in (r.get("load_average") or []) if x is not None) or "–",
            f"{r['steps']} ({r.get('best_step')})" + (f" × {r['batch_size']} @ {r['lr']:g}" if "lr" in r else ""),
            # a first load parses the GGUF (~20 s); later ones read the saved float32 copy (~1 s)
            f"{r['phase_seconds']['load_model']:.0f}" if "load_model" in r.get("phase_seconds", {}) else "–",
            f"{r['train_seconds'] / 60:.1f}", f"{r['total_seconds'] / 60:.1f}",
            f"{r['zero_shot']['bleu']:.4f}", f"{s['bleu']:.4f}", f"{s['nist']:.3f}", f"{s['meteor']:.4f}",
            f"{s['rouge_l']:.4f}", f"{s['cider']:.3f}"]) + " |")
    return "\n".join(lines) + "\n\nRecords: " + ", ".join(
        f"[`{Path(p).name}`]({link(p)})" for p in paths) + ".\n"


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e})") from None


def _vision_rows(root: Path, arg: str) -> list[dict]:
    rows = read_results(root / arg)
    if not rows:
        raise ReportError(f"{root / arg / 'results.jsonl'} not found: run `prefixtune experiment ... --out {arg}` first")
    return rows


def _records(root: Path, arg: str, what: str) -> list[str]:
    """The files matching the block's glob, in name (date) order; at least one."""
    paths = sorted(glob.glob(str(root / arg)))
    if not paths:
        raise ReportError(f"no {what} matches {arg}")
    return paths


def _vision_probe_block(root: Path, arg: str, link) -> str:
    from .vision.probe import probe_table  # the image experiments import torch: only where a doc asks for them

    paths = _records(root, arg, "probe.json")
    return probe_table([_read_json(p) for p in paths]) + "\nData: " + ", ".join(
        f"[`{Path(p).parent.name}/{Path(p).name}`]({link(p)})" for p in paths) + ".\n"


def _vision_vpt_block(root: Path, arg: str, link) -> str:
    # the image experiments import torch: only where a doc asks for their table (start-up time)
    from .vision.vpt import vpt_table_body

    return vpt_table_body(_vision_rows(root, arg))


def _vision_l2p_block(root: Path, arg: str, link) -> str:
    # the image experiments import torch: only where a doc asks for their table (start-up time)
    from .vision.l2p import l2p_table_body

    return l2p_table_body(_vision_rows(root, arg))


def _prefix_memory_block(root: Path, arg: str, link) -> str:
    paths = _records(root, arg, "bench/prefix_memory.py record")
    lines = ["| record | requests | prefixes kept (cache) | RSS growth | per kept prefix | peak during the requests |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for p in paths:
        r = _read_json(p)
        for run in r["runs"]:
            per = run["rss_growth"] / max(run["cached_prefixes"], 1)
            lines.append(f"| [{r['date']}]({link(p)}), {r['commit']}, {r['cpu']} ×{r['cores']} | {r['prefixes']} "
                         f"{'at once' if run['mode'] == 'concurrent' else 'one after another'} | "
                         f"{run['cached_prefixes']} ({run['cached_prefix_bytes'] / 2 ** 20:.0f} MiB) | "
                         f"+{run['rss_growth'] / 1e6:,.0f} MB | {per / 1e6:.1f} MB ({per / r['file_bytes']:.2f}× the "
                         f"{r['file_bytes'] / 1e6:.1f} MB file) | +{run['peak_growth'] / 1e6:,.0f} MB |")
    return "\n".join(lines) + "\n"


def _replicas_block(root: Path, arg: str, link) -> str:
    paths = _records(root, arg, "bench/bench_replicas.py record")
    lines = ["| record | load average | round | 1 replica, req/s | 2 replicas, req/s | two / one | "
             "1 replica on SQLite, req/s | wrong answers |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in paths:
        r = _read_json(p)
        for i, rnd in enumerate(r["rounds"]):
            wrong = rnd["one"]["wrong"] + rnd["two"]["wrong"] + (r["sqlite"]["wrong"] if i == 0 else 0)
            lines.append(f"| [{r['date']}]({link(p)}), {r['commit']}, {r['cpu']} ×{r['cores']}, {r['requests']} requests, "
                         f"{r['clients']} clients | {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f} | {i + 1} | "
                         f"{rnd['one']['rps']:.1f} | {rnd['two']['rps']:.1f} | {rnd['two']['rps'] / rnd['one']['rps']:.2f}× | "
                         f"{r['sqlite']['rps']:.1f} | {wrong} |")
    return "\n".join(lines) + "\n"


def _method_sizes_block(root: Path, arg: str, link) -> str:
    record = _read_json(root / arg)
    lines = ["| model (parameters) | method: configuration | trains (optimizer) | artifact values (saved, served) | file |",
             "| --- | --- | ---: | ---: | ---: |"]
    for e in record["entries"]:
        def share(n: int) -> str:  # of the base model's parameters
            return f"{n:,} ({100 * n / e['base_params']:.3g}%)"
        lines.append(f"| {e['model']} ({e['base_params']:,}) | `{e['method']}`: {e['configuration']} | "
                     f"{share(e['trainable'])} | {share(e['artifact_values'])} | {file_size(e['file_bytes'])} |")
    versions = record["versions"]
    return "\n".join(lines) + (f"\n\nMeasured {record['date']} (prefixtune {versions['prefixtune']}, transformers "
                               f"{versions['transformers']}): [`{Path(arg).name}`]({link(root / arg)}), written by "
                               "`python scripts/method_sizes.py`.\n")


GENERATORS = {"experiment": _experiment_block, "selection": _selection_block, "bench-ratios": _bench_block,
              "demo-runs": _demo_block, "vision-probe": _vision_probe_block, "vision-vpt": _vision_vpt_block,
              "vision-l2p": _vision_l2p_block, "method-sizes": _method_sizes_block,
              "prefix-memory": _prefix_memory_block, "replicas": _replicas_block}


def render(text: str, root: Path, where: str = "docs/doc.md") -> str:
    """`text` (the doc at root/`where`) with every generated block rewritten from the data."""
    def link(path) -> str:  # a data file as a link relative to the doc
        return os.path.relpath(Path(path).resolve(), (Path(root) / where).resolve().parent).replace(os.sep, "/")

    def replace(m: re.Match) -> str:
        kind, arg = m["kind"], m["arg"].strip()
        if kind not in GENERATORS:
            raise ReportError(f"{where}: unknown generated block kind {kind!r} (known: {', '.join(GENERATORS)})")
        try:
            body = GENERATORS[kind](root, arg, link).rstrip("\n") + "\n"
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ReportError):
                raise
            raise ReportError(f"{where}: block '{kind} {arg}': its data lacks a field it needs ({e!r})") from None
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(replace, text)


def regenerate(root: str | Path = ".", check: bool = False, redraw: bool = True) -> list[str]:
    """Rewrite every generated block of the docs (and redraw the experiments' tables and figures);
    returns the docs whose blocks differed. `check=True` writes nothing."""
    root = Path(root)
    if redraw and not check:
        for meta in sorted((root / "results").glob("*/experiment.json")):
            exp, rows, _ = load_experiment(meta.parent)
            write_outputs(exp, meta.parent, rows)
    changed = []
    for name in DOCS:
        path = root / name
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        new = render(text, root, name)
        if new != text:
            changed.append(name)
            if not check:
                atomic_write_bytes(path, new.encode())
    return changed
