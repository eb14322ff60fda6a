"""The paper's experiments (Li & Liang 2021, §6-§7 and the P-tuning v2 comparison) as run lists.

`build(name, scale, ...)` returns an Experiment: the RunSpecs of its sweep plus how to tabulate and
draw it. `run_experiment` fans the runs out (sweeps.run_sweep) and writes table.md and the figure.
Scales: `paper` (the paper's sizes, seeds and recipe epochs), `quick` (fewer sizes/seeds/steps, 80-step
runs: about an hour per experiment where a SmolLM2-135M step takes ~1 s, as on a 2-core CPU with
native bf16; several hours on an fp32-only one, measured in docs/results.md), `tiny` (tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .protocol import Protocol, comparison_specs, select_learning_rates
from .stats import Interval, mean_std
from .sweeps import RunSpec, read_results, run_sweep


@dataclass(frozen=True)
class Scale:
    sizes: tuple[int, ...]          # low-data training sizes (pairs)
    seeds: tuple[int, ...]          # each seed samples its own training set and seeds training
    full_size: int | None           # "full data" size for §7 ablations (None: the whole training split)
    max_steps: int | None           # cap on optimizer steps (None: the recipe's epochs)
    eval_limit: int | None          # evaluation sources per run (None: all)
    num_beams: int
    max_new_tokens: int
    epochs: int | None = None       # override of the recipe's epochs (low data needs more passes)
    # steps capped at a few hundred: each method starts from its `short_run_learning_rate` where it has
    # one (the recipes carry long-run rates, set for thousands of steps)
    short_run: bool = False
    # held-out questions a classifier (ptuning-v2) is scored on: one forward pass each, so many more than
    # generation sources; accuracy on 40 would have a standard error of about 0.08, on 1,000 about 0.015
    classifier_eval: int | None = None
    # the budget rule (protocol.py): dev loss every `eval_every` steps, stop after `patience` evaluations
    # without improvement, at most `max_steps`; None: the recipe's epochs with one evaluation each
    eval_every: int | None = None
    patience: int | None = None
    warmup_steps: int | None = None


SCALES = {
    "paper": Scale(sizes=(50, 100, 200, 500), seeds=(0, 1, 2, 3, 4), full_size=None, max_steps=None,
                   eval_limit=None, num_beams=5, max_new_tokens=60),
    # quick: three seeds, 200 evaluation sources, early stopping (dev loss every 10 steps, patience 3) under
    # a 200-step cap. The rates searched around: the recipes carry the paper's long-run rates (8e-5 for
    # the prefix on E2E), set for thousands of steps; at a few hundred steps the prefix and the adapter
    # start their grid at 1e-3 (measured 2026-11-28: E2E n50, prefix at 8e-5 still falling at step 80)
    "quick": Scale(sizes=(50, 200), seeds=(0, 1, 2), full_size=200, max_steps=200, eval_limit=200, num_beams=1,
                   max_new_tokens=60, epochs=1000, short_run=True, classifier_eval=1000,
                   eval_every=10, patience=3, warmup_steps=10),
    "tiny": Scale(sizes=(20, 40), seeds=(0,), full_size=40, max_steps=4, eval_limit=4, num_beams=1,
                  max_new_tokens=6, epochs=2, classifier_eval=4, eval_every=2, patience=2),
}

# Where training sets are sampled from when the data here has no separate training split: the
# shared E2E and BoolQ are their dev splits only (see ../shared/data/README.md; BoolQ's loader carves
# its small train/dev/test parts from that file, the sweep samples from all of it); jsonl files are "all".
_SAME_SPLIT = {"e2e": "dev", "boolq": "all", "jsonl": "all", "xsum": "validation"}


# WebNLG 2017 categories held out of training for `extrapolation` (5 of the 10 in train/dev; the
# official unseen test categories are not available here).
UNSEEN_WEBNLG = ("Astronaut", "ComicsCharacter", "Food", "SportsTeam", "WrittenWork")

DEFAULTS = {  # experiment -> (dataset, model, methods)
    "low-data": ("e2e", "smollm2-135m", ("prefix", "finetune", "adapter", "lora")),
    "extrapolation": ("webnlg2017", "smollm2-135m", ("prefix", "finetune", "adapter")),
    "prefix-length": ("e2e", "smollm2-135m", ("prefix",)),
    "embedding-only": ("e2e", "smollm2-135m", ("prompt", "prefix")),
    "infix": ("e2e", "smollm2-135m", ("infix", "prefix")),
    "init": ("e2e", "smollm2-135m", ("prefix",)),
    "ptuning-v2": ("boolq", "minilm-l6", ("ptuning-v2", "prompt", "finetune", "probe")),
    # every registered generation method at one training size (docs/methods.md's table)
    "methods": ("e2e", "smollm2-135m", None),
}
# Soft-prompt sizes and init, applied to whichever methods have these options: low-data is §6.3's
# (length 6, init from the task's name), the method table uses a longer prompt.
LOW_DATA_OPTIONS = {"length": 6, "init_text": "table-to-text:"}
METHOD_TABLE_OPTIONS = {"length": 10, "init_text": "table-to-text: restaurant description"}
METHOD_TABLE_SIZE = 200
# The arms of `ptuning-v2`: one classifier (a linear head on [CLS], methods/ptuning_v2.py) with the prompt
# at every layer, at the input only, or absent, and the encoder frozen or trained. --methods takes these names.
CLASSIFIER_ARMS = {
    "ptuning-v2": {},                                                          # deep prompts, frozen encoder
    "prompt": {"prompt_depth": "input"},                                       # shallow prompt tuning (Lester et al.)
    "finetune": {"prompt_depth": "none", "tune_encoder": True, "lr": 5e-5},    # encoder + head, BERT's usual rate
    "probe": {"prompt_depth": "none"},                                         # the head alone on frozen features
}
EXPERIMENTS = tuple(DEFAULTS)
# Image experiments (linear probes, VPT vs baselines, L2P on split CIFAR-10): run by vision_experiments.py,
# to which `prefixtune experiment` hands them (images have their own data path); docs/vision.md
VISION_EXPERIMENTS = ("probe", "vpt", "l2p")
EXPERIMENTS = EXPERIMENTS + VISION_EXPERIMENTS
# "Full data" where the only split here is a dev split (E2E 4,672 pairs, BoolQ 3,270): train on this
# many pairs, the rest gives the dev loss and evaluation.
SAME_SPLIT_FULL = 2500


@dataclass
class Experiment:
    name: str
    scale: str
    model: str
    dataset: str
    runs: list[RunSpec]
    group_by: tuple[str, ...]                 # row labels a table line is keyed by (seeds averaged)
    x: str | None = None                      # numeric label for the figure's x axis
    notes: list[str] = field(default_factory=list)


class ExperimentError(ValueError):
    """A user-facing problem with an experiment request (unknown name, unregistered method/dataset)."""


def _check_available(name: str, dataset: str, methods) -> None:
    from .data.registry import get_spec
    from .methods import METHODS

    if name == "ptuning-v2":
        unknown = [m for m in methods if m not in CLASSIFIER_ARMS]
        if unknown:
            raise ExperimentError(f"experiment 'ptuning-v2' compares classifiers {', '.join(CLASSIFIER_ARMS)}; "
                                  f"unknown: {', '.join(unknown)}")
        methods = ("ptuning-v2",)
    missing = [m for m in methods if m not in METHODS]
    if missing:
        raise ExperimentError(f"experiment {name!r} needs method(s) {', '.join(missing)}, not registered in this "
                              f"build (registered: {', '.join(METHODS)}); choose others with --methods")
    if not str(dataset).lower().endswith(".jsonl") and dataset != "jsonl":
        try:
            get_spec(dataset)
        except Exception as e:  # noqa: BLE001 - the registry's own message names the known datasets
            raise ExperimentError(f"experiment {name!r} needs dataset {dataset!r}: {e}") from None


def _plan(dataset: str, data_dir, path, size: int | None, seed: int, **extra) -> dict:
    """Same-split low-data plan where the data has no training split here, else train/dev."""
    from .recipes import canonical

    split = _SAME_SPLIT.get(canonical(dataset))
    plan = {"dataset": dataset, "data_dir": data_dir, "path": path, "seed": seed, "train_size": size, **extra}
    if split is not None:
        if size is None:
            raise ExperimentError(f"{dataset} has no training split here: the scale must give a training size")
        # dev set for early stopping: 30% of the training size (paper §6.3), from held-out sources; at most
        # 100 sources, so that a large training sample still leaves sources to evaluate on
        return {**plan, "train_split": split, "eval_split": split,
                "dev_sources": max(2, min(100, math.ceil(0.3 * size)))}
    return {**plan, "train_split": "train", "eval_split": "dev"}


def build(name: str, scale: str = "quick", model: str | None = None, dataset: str | None = None,
          data_dir: str | None = None, path: str | None = None, methods=None, seeds=None,
          sizes=None, bf16: bool = False) -> Experiment:
    """`seeds`/`sizes` replace the scale's (a subset now, more later: completed runs are skipped)."""
    if name not in DEFAULTS:
        raise ExperimentError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    from .methods import METHODS, get_method
    from .recipes import configs_for

    d_dataset, d_model, d_methods = DEFAULTS[name]
    dataset, model = dataset or d_dataset, model or d_model
    if d_methods is None:  # every registered method that trains generation
        d_methods = tuple(n for n, cls in METHODS.items() if cls.generates)
    methods = tuple(methods) if methods else d_methods
    _check_available(name, dataset, methods)
    s = SCALES[scale]
    for what, values, least in (("seeds", seeds, 0), ("sizes", sizes, 1)):
        if values is None:
            continue
        values = tuple(values)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < least for v in values):
            raise ExperimentError(f"--{what} must be integers >= {least}, got {list(values)}")
        s = dataclasses.replace(s, **{what: tuple(dict.fromkeys(values))})
    if s.full_size is None and _needs_size(dataset):  # no training split here: sample a large part of the one split
        s = dataclasses.replace(s, full_size=SAME_SPLIT_FULL)
    train = {k: v for k, v in (("max_steps", s.max_steps), ("epochs", s.epochs), ("eval_every", s.eval_every),
                                ("patience", s.patience), ("warmup_steps", s.warmup_steps)) if v is not None}
    if bf16:  # only when asked: fp32 rows keep the ids and settings they were recorded with
        train["bf16"] = True
    decode = {"num_beams": s.num_beams, "max_new_tokens": s.max_new_tokens}
    runs: list[RunSpec] = []

    def add(label: str, method: str, size, seed, overrides=None, plan_extra=None, eval_limit=s.eval_limit, **labels):
        overrides = {**train, "seed": seed, **(overrides or {})}
        short_lr = get_method(method).short_run_learning_rate
        if s.short_run and short_lr is not None:
            overrides.setdefault("lr", short_lr)
        if size and _needs_size(dataset):  # the dev loss uses 30% of the training size in pairs (paper §6.3)
            overrides["dev_max_examples"] = max(2, math.ceil(0.3 * size))
        # options a method does not have (lengths and init of the soft-prompt family) are not passed to it
        overrides = {k: v for k, v in overrides.items() if k in _option_names(method)}
        if "lr" not in overrides:  # the rate the learning-rate grid is centred on: the method's recipe rate
            overrides["lr"] = configs_for(dataset, method, **{k: v for k, v in overrides.items()
                                                              if k in ("lr",)})[1].lr
        group = "-".join(str(p) for p in (label, f"n{size}" if size else "full"))
        runs.append(RunSpec(id=f"{group}-s{seed}", method=method, dataset=dataset,
                            plan=_plan(dataset, data_dir, path, size, seed, **(plan_extra or {})),
                            overrides=overrides, decode=decode, eval_limit=eval_limit,
                            labels={"label": label, **labels}, group=group))

    notes = [f"scale {scale}: sizes {list(s.sizes)}, seeds {list(s.seeds)}, "
             f"{'max ' + str(s.max_steps) + ' steps' if s.max_steps else 'recipe epochs'}, "
             f"{'epochs ' + str(s.epochs) + ', ' if s.epochs else ''}"
             f"{'first ' + str(s.eval_limit) if s.eval_limit else 'all'} evaluation sources, beam {s.num_beams}"
             + (", learning-rate grids centred on each method's short-run rate" if s.short_run else "")
             + (f"; early stopping: dev loss every {s.eval_every} steps, patience {s.patience}" if s.patience else "")]
    if name == "low-data":  # §6.3: prefix length 6, batch 10, init from the task's name
        for m in methods:
            extra = _options_it_has(m, LOW_DATA_OPTIONS)
            for size in s.sizes:
                for seed in s.seeds:
                    add(m, m, size, seed, {"batch_size": 10, **extra})
        return Experiment(name, scale, model, dataset, runs, ("label", "train_size"), x="train_size", notes=notes)
    if name == "methods":  # every generation method on one budget, each at its own chosen learning rate
        size = METHOD_TABLE_SIZE if scale != "tiny" else s.sizes[0]
        for m in methods:
            extra = _options_it_has(m, METHOD_TABLE_OPTIONS)
            for seed in s.seeds:
                add(m, m, size, seed, {"batch_size": 10, **extra})
        return Experiment(name, scale, model, dataset, runs, ("label", "train_size"), notes=notes)
    if name == "init":  # §7.4: random vs task words vs irrelevant words, in low data
        inits = {"random": {"init": "random"}, "table-to-text:": {"init": "text", "init_text": "table-to-text:"},
                 "elephant": {"init": "text", "init_text": "elephant"}}
        for label, o in inits.items():
            for size in s.sizes:
                for seed in s.seeds:
                    add(f"init={label}", "prefix", size, seed, {"length": 6, "batch_size": 10, **o}, init=label)
        return Experiment(name, scale, model, dataset, runs, ("label", "train_size"), x="train_size", notes=notes)
    if name == "extrapolation":  # §6.4: train on seen categories, evaluate seen vs unseen
        for m in methods:
            for seed in s.seeds:
                add(m, m, s.full_size if _needs_size(dataset) else None, seed,
                    plan_extra={"exclude_categories": UNSEEN_WEBNLG})
        notes.append(f"held out of training: {', '.join(UNSEEN_WEBNLG)} (WebNLG 2017 dev split evaluated)")
        return Experiment(name, scale, model, dataset, runs, ("label",), notes=notes)
    if name == "prefix-length":  # §7.1
        lengths = (1, 5, 10, 20) if scale != "tiny" else (1, 4)
        if scale == "paper":
            lengths = (1, 5, 10, 20, 40)
        for n in lengths:
            for seed in s.seeds:
                add(f"prefix-{n}", "prefix", s.full_size, seed, {"length": n}, length=n)
        return Experiment(name, scale, model, dataset, runs, ("label", "length"), x="length", notes=notes)
    if name == "embedding-only":  # §7.2: EMB-1/10/20 (soft input embeddings only) vs prefix
        for m in methods:
            for n in ((1, 10, 20) if m == "prompt" else (10,)):
                label = f"EMB-{n}" if m == "prompt" else f"{m}-{n}"
                for seed in s.seeds:
                    add(label, m, s.full_size, seed, {"length": n}, length=n)
        return Experiment(name, scale, model, dataset, runs, ("label",), notes=notes)
    if name == "infix":  # §7.3: [x; INFIX; y] vs [PREFIX; x; y] at equal length
        for m in methods:
            for seed in s.seeds:
                add(f"{m}-10", m, s.full_size, seed, {"length": 10}, length=10)
        return Experiment(name, scale, model, dataset, runs, ("label",), notes=notes)
    # ptuning-v2: deep prompts vs shallow prompt tuning vs fine-tuning on BoolQ, accuracy
    for m in methods:
        for seed in s.seeds:
            add(m, "ptuning-v2", s.full_size, seed, CLASSIFIER_ARMS[m], eval_limit=s.classifier_eval)
    notes.append(f"BoolQ: accuracy on {s.classifier_eval or 'all'} held-out questions; arms: the ptuning-v2 classifier "
                 "with deep prompts, input-only prompts (prompt), no prompt and the encoder trained (finetune), "
                 "or the head alone (probe)")
    return Experiment(name, scale, model, dataset, runs, ("label",), notes=notes)


def _options_it_has(method: str, options: dict) -> dict:
    """The subset of `options` that `method`'s config has (soft-prompt sizes and init); an `init_text`
    comes with init='text' where the method also has an `init` option."""
    from .methods import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    out = {k: v for k, v in options.items() if k in fields}
    if "init_text" in out and "init" in fields:
        out["init"] = "text"
    return out


def _option_names(method: str) -> set[str]:
    from .methods import get_method
    from .train import TrainConfig

    return ({f.name for f in dataclasses.fields(get_method(method).config_class)} |
            {f.name for f in dataclasses.fields(TrainConfig)})


def _needs_size(dataset: str) -> bool:
    from .recipes import canonical

    return canonical(dataset) in _SAME_SPLIT


# ---------------------------------------------------------------------------------------------
# Tables and figures


def _metric_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.get("scores", {}).items():
            if isinstance(v, (int, float)) and k not in cols:
                cols.append(k)
    return cols


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, sd = mean_std(values)
    return f"{m:.4g} ± {sd:.2g}" if len(values) > 1 else f"{m:.4g}"


def _predictions(out: Path, run_id: str) -> dict[str, dict] | None:
    path = out / "runs" / run_id / "eval" / "predictions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["source"]: r for r in rows}


def intervals_vs(exp: Experiment, out: Path, rows: list[dict], reference: str = "prefix",
                 resamples: int = 1000) -> dict[tuple, Interval]:
    """Per table group: paired bootstrap 95% interval of (group's BLEU - `reference`'s BLEU), pairing
    seed with seed at the same training size (same training sample, same evaluation sources)."""
    from .recipes import recipe_for
    from .stats import BleuStats, paired_bootstrap

    try:
        bleu = BleuStats(recipe_for(exp.dataset).metric)
    except ValueError:
        return {}
    ref_rows = {(r.get("train_size"), r.get("seed")): r for r in rows if r.get("label") == reference}
    result = {}
    for key, group in _groups(rows, exp.group_by).items():
        if group[0].get("label") == reference:
            continue
        pairs = []
        for r in group:
            ref = ref_rows.get((r.get("train_size"), r.get("seed")))
            a, b = _predictions(out, r["id"]), _predictions(out, ref["id"]) if ref else None
            if a is None or b is None:
                continue
            sources = [src for src in a if src in b]
            if len(sources) != len(a) or len(sources) != len(b):
                raise ValueError(f"{r['id']} and {ref['id']} were evaluated on different sources")
            pairs.append((bleu.per_source([a[x]["output"] for x in sources], [a[x]["references"] for x in sources]),
                          bleu.per_source([b[x]["output"] for x in sources], [b[x]["references"] for x in sources])))
        if pairs:
            result[key] = paired_bootstrap(pairs, bleu.score, resamples=resamples)
    return result


def table_markdown(exp: Experiment, rows: list[dict], out: Path | None = None, choices: dict | None = None,
                   reference: str = "prefix") -> str:
    """Means ± sample std over seeds, one line per group; the chosen learning rate, how many seeds
    stopped early (the budget rule), and BLEU minus the reference method's with a paired bootstrap 95%
    interval and what it allows saying."""
    cols = _metric_columns(rows)
    split_cols = [f"{c} {g}" for g in ("seen", "unseen") for c in cols[:1]] if any("scores_seen" in r for r in rows) else []
    intervals = intervals_vs(exp, out, rows, reference) if out is not None and "bleu" in cols else {}
    cmp_col = [f"BLEU − {reference} [95% CI]"] if intervals else []
    head = list(exp.group_by) + ["seeds", "lr", "stopped early", "trainable params"] + cols + split_cols + cmp_col + \
        ["dev loss", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in _groups(rows, exp.group_by).items():
        lrs = sorted({r.get("lr") for r in group if r.get("lr")})
        early = [r for r in group if r.get("stopped_early") is not None]
        cells = [str(k) if k is not None else "" for k in key] + [str(len(group)), ", ".join(f"{x:g}" for x in lrs) or "–",
                                                                  f"{sum(bool(r['stopped_early']) for r in early)}/{len(early)}"
                                                                  if early else "–",
                                                                  f"{group[0].get('trainable_params') or 0:,}"]
        cells += [_fmt([r["scores"][c] for r in group if c in r.get("scores", {})]) for c in cols]
        for g in ("seen", "unseen") if split_cols else ():
            cells.append(_fmt([r[f"scores_{g}"][cols[0]] for r in group if f"scores_{g}" in r]))
        if cmp_col:
            iv = intervals.get(key)
            cells.append(f"{iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] {iv.verdict()}" if iv else "–")
        cells.append(_fmt([r["best_dev_loss"] for r in group if isinstance(r.get("best_dev_loss"), (int, float))
                           and math.isfinite(r["best_dev_loss"])]))
        cells.append(_fmt([r["train_seconds"] for r in group]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def partial_choices(selection_rows: list[dict]) -> dict:
    """lr_choice.json's shape from the selection runs recorded so far (a grid still running: no choice)."""
    out: dict = {}
    for r in selection_rows:
        c = out.setdefault(r["group"], {"method": r["method"], "dev_loss": {}, "chosen": None, "runs": []})
        loss = r.get("best_dev_loss")
        c["dev_loss"][f"{r['lr']:g}"] = loss if loss is not None else math.inf
        c["runs"].append(r["id"])
    for c in out.values():
        c["dev_loss"] = dict(sorted(c["dev_loss"].items(), key=lambda kv: float(kv[0])))
    return out


def selection_markdown(choices: dict) -> str:
    """The learning-rate grid of every group: each point's best dev loss, the choice marked."""
    if not choices:
        return ""
    lines = ["| group | method | dev loss at each learning rate (seed 0) | chosen |", "|---|---|---|---|"]
    for g, c in choices.items():
        pts = ", ".join(("**" if float(k) == c.get("chosen") else "") + f"{k}: " +
                        (f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "diverged") +
                        ("**" if float(k) == c.get("chosen") else "") for k, v in c["dev_loss"].items())
        edge = f" (at the {c['at_edge']} edge)" if c.get("at_edge") else ""
        chosen = f"{c['chosen']:g}{edge}" if c.get("chosen") is not None else "grid not finished"
        lines.append(f"| {g} | {c['method']} | {pts} | {chosen} |")
    return "\n".join(lines) + "\n"


def report_markdown(exp: Experiment, rows: list[dict], out: Path, choices: dict | None) -> str:
    lines = [f"# {exp.name} ({exp.scale} scale)", "", f"Model `{exp.model}`, dataset `{exp.dataset}`. "
             "Mean ± sample standard deviation over seeds (each seed samples its own training set).", ""]
    lines += [f"- {n}" for n in exp.notes] + [""]
    lines.append(table_markdown(exp, rows, out, choices))
    if choices:
        lines += ["", "Learning rates (chosen on the dev loss of held-out sources, seed 0):", "",
                  selection_markdown(choices)]
    return "\n".join(lines)


def draw_figure(exp: Experiment, rows: list[dict], path: str | Path) -> Path | None:
    """The paper's figure shape: metric vs training size / prefix length with one line per method
    (error bars: std over seeds); otherwise grouped bars (seen/unseen for extrapolation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_png

    cols = _metric_columns(rows)
    if not cols:
        return None
    metric = "bleu" if "bleu" in cols else cols[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if exp.x:
        by_label = _groups(rows, ("label",))
        for (label,), group in by_label.items():
            xs = sorted({r[exp.x] for r in group if r.get(exp.x) is not None})
            stats = [mean_std([r["scores"][metric] for r in group if r.get(exp.x) == x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label=label)
        ax.set_xlabel(exp.x.replace("_", " "))
        if exp.x == "train_size":
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(sorted({r["train_size"] for r in rows}), [str(v) for v in sorted({r["train_size"] for r in rows})])
    else:
        parts = ("seen", "unseen") if any("scores_seen" in r for r in rows) else (None,)
        labels = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / len(parts)
        for j, part in enumerate(parts):
            key = f"scores_{part}" if part else "scores"
            stats = [mean_std([r[key][metric] for r in rows if r["label"] == lab and key in r] or [float("nan")])
                     for lab in labels]
            ax.bar([i + j * width for i in range(len(labels))], [m for m, _ in stats], width,
                   yerr=[sd for _, sd in stats], capsize=3, label=part)
        ax.set_xticks([i + width * (len(parts) - 1) / 2 for i in range(len(labels))], labels, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{exp.name} ({exp.scale}) · {exp.model}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def run_experiment(exp: Experiment, out: str | Path, ray_address: str | None = None,
                   print_fn: Callable[[str], None] = print, progress=None, protocol: Protocol | None = None,
                   cpus_per_run: int | None = None) -> dict:
    """The experiment under the fair-comparison protocol (protocol.py): learning rates chosen per
    method on dev data, then every seed at the chosen rate, plus the zero-step row."""
    from .recipes import recipe_for

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = protocol or Protocol()
    save_experiment_meta(exp, out)
    for n in exp.notes:
        print_fn(n)
    choices = select_learning_rates(exp.runs, exp.model, out, protocol, ray_address=ray_address, print_fn=print_fn,
                                    progress=progress, cpus_per_run=cpus_per_run)
    specs = comparison_specs(exp.runs, choices, protocol, generates=recipe_for(exp.dataset).metric != "accuracy")
    run_sweep(specs, exp.model, out, ray_address=ray_address, print_fn=print_fn, progress=progress,
              cpus_per_run=cpus_per_run)
    return write_outputs(exp, out)  # every row on record: other seeds and sizes from earlier commands too


def save_experiment_meta(exp: Experiment, out: Path) -> None:
    """What the report needs to redraw this folder's table and figures without the command line."""
    from .files import atomic_write_bytes

    atomic_write_bytes(Path(out) / "experiment.json", json.dumps(
        {k: v for k, v in dataclasses.asdict(exp).items() if k != "runs"}, indent=2).encode())


def write_outputs(exp: Experiment, out: str | Path, rows: list[dict] | None = None) -> dict:
    from .files import atomic_write_bytes

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


def draw_dev_curves(out: Path, choices: dict, path: Path) -> Path | None:
    """One panel per group: the seed-0 dev-loss curve at every learning rate of its grid (the chosen
    one bold), so anyone can see where each run stopped improving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_png
    from .sweeps import SELECTION

    sel = {r["id"]: r for r in read_results(out, SELECTION)}
    groups = list(choices)
    if not groups:
        return None
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        c = choices[g]
        for run_id in c["runs"]:
            r = sel.get(run_id)
            if not r or not r.get("dev_curve"):
                continue
            xs, ys = zip(*r["dev_curve"])
            chosen = r.get("lr") == c["chosen"]
            ax.plot(xs, ys, lw=2.2 if chosen else 1, label=f"{r.get('lr'):g}" + (" *" if chosen else ""))
        ax.set_title(g, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("dev loss", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
