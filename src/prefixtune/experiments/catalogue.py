"""The catalogue: one declarative spec per text experiment (Li & Liang 2021 §6-§7, the P-tuning v2
comparison, the method table) and the one builder that turns a spec and a scale into runs.

A spec says what an experiment trains (dataset, model, methods or named arms), what varies besides the
seed (training sizes; at most one other setting, e.g. prefix length or initialization), how rows are
labelled and grouped, and the notes of its table. `build(name, scale, ...)` looks the spec up and
hands it to `build_runs`, which knows no experiment and no method by name: an experiment is added by
adding a spec to CATALOGUE. The image experiments (probe, vpt, l2p) have their own data path and run
in vision/.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from ..data.registry import get_spec
from ..recipes import canonical
from .executor import RunSpec
from .protocol import centre_learning_rate
from .scales import SCALES, Scale


@dataclass
class Experiment:
    """An experiment as built: its runs, and how its table and figure are drawn (experiment.json holds
    everything but the runs)."""

    name: str
    scale: str
    model: str
    dataset: str
    runs: list[RunSpec]
    group_by: tuple[str, ...]                 # row labels a table line is keyed by (seeds averaged)
    x: str | None = None                      # numeric label for the figure's x axis
    notes: list[str] = field(default_factory=list)
    reference: str = "prefix"                 # the row label every other row's BLEU (accuracy) is compared with
    # the scale's sizes and seeds as the folder's commands asked for them (a command with --sizes/--seeds
    # adds to what earlier ones recorded: `with_earlier`), and the scale note written from them
    sizes: list = field(default_factory=list)
    seeds: list = field(default_factory=list)

    def with_earlier(self, earlier: dict) -> "Experiment":
        """This experiment as recorded after `earlier` (an experiment.json of the same experiment, scale,
        model and data): sizes and seeds are the union, and the scale note says so."""
        same = all(earlier.get(k) == getattr(self, k) for k in ("name", "scale", "model", "dataset"))
        if not same or self.scale not in SCALES or not self.notes:
            return self
        sizes = list(dict.fromkeys(list(earlier.get("sizes") or []) + self.sizes))
        seeds = list(dict.fromkeys(list(earlier.get("seeds") or []) + self.seeds))
        s = dataclasses.replace(SCALES[self.scale], sizes=tuple(sizes), seeds=tuple(seeds))
        return dataclasses.replace(self, sizes=sizes, seeds=seeds, notes=[scale_note(self.scale, s)] + self.notes[1:])


class ExperimentError(ValueError):
    """A user-facing problem with an experiment request (unknown name, unregistered method/dataset)."""


# ---------------------------------------------------------------------------------------------
# What a spec is made of


@dataclass(frozen=True)
class Per:
    """A spec value that differs by scale or by arm: an `arm` entry wins, then a `scale` entry, else `default`."""

    default: Any
    scale: Mapping[str, Any] = field(default_factory=dict)
    arm: Mapping[str, Any] = field(default_factory=dict)

    def get(self, scale: str, arm: str | None = None):
        if arm in self.arm:
            return self.arm[arm]
        return self.scale.get(scale, self.default)


def _resolve(value, scale: str, arm: str | None = None):
    return value.get(scale, arm) if isinstance(value, Per) else value


class Sizes(Enum):
    """Where an experiment's training sizes come from (a spec may also give a tuple of sizes)."""

    SCALE = "each of the scale's low-data sizes"
    FIRST = "the first of the scale's sizes"
    FULL = "the scale's full-data size"
    WHOLE_SPLIT = "the whole training split where the data has one, else the scale's full-data size"


@dataclass(frozen=True)
class Arm:
    """A compared system that is not just a method: the method it trains and the options that make it this arm."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    """A setting varied besides training size and seed, one table line per value. `name` becomes a row
    label; a value sets the method options `options[value]` (default: {name: value})."""

    name: str
    values: tuple | Per
    options: Mapping[Any, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, value) -> dict:
        return dict(self.options.get(value, {self.name: value}))


@dataclass(frozen=True)
class ExperimentSpec:
    about: str                                  # what it measures (the paper's section)
    dataset: str
    model: str
    # the arms compared by default, each a method name, or a name of `arms`; None: every registered method
    # that generates text
    methods: tuple[str, ...] | None
    # named arms that `--methods` chooses among; None: each arm is the method of its name
    arms: Mapping[str, Arm] | None = None
    arms_are: str = "arms"                      # what the arms are called in an error message
    sizes: Sizes | tuple[int | None, ...] | Per = Sizes.FULL
    axis: Axis | None = None
    options: Mapping[str, Any] = field(default_factory=dict)          # every run's (those its method has)
    # soft-prompt size and init, given to the methods that have these options (`_options_it_has`)
    prompt_options: Mapping[str, Any] = field(default_factory=dict)
    plan: Mapping[str, Any] = field(default_factory=dict)             # DataPlan fields beside the sample
    # the row label, formatted with the arm's name, its method and the axis value (by the axis name)
    label: str | Per = "{arm}"
    group_by: tuple[str, ...] = ("label",)
    x: str | None = None                        # the figure's x axis (a numeric row label)
    notes: tuple[str, ...] = ()                 # formatted with the scale's fields (None reads "all")
    reference: str = Experiment.reference       # the row other rows' BLEU (accuracy) is compared with: the paper's method


# ---------------------------------------------------------------------------------------------
# The experiments

SMOLLM = "smollm2-135m"
# WebNLG 2017 categories held out of training for `extrapolation` (5 of the 10 in train/dev; the
# official unseen test categories are not available here).
UNSEEN_WEBNLG = ("Astronaut", "ComicsCharacter", "Food", "SportsTeam", "WrittenWork")
# Soft-prompt sizes and init, applied to whichever methods have these options: low-data is §6.3's
# (length 6, init from the task's name), the method table uses a longer prompt.
LOW_DATA_OPTIONS = {"length": 6, "init_text": "table-to-text:"}
METHOD_TABLE_OPTIONS = {"length": 10, "init_text": "table-to-text: restaurant description"}
METHOD_TABLE_SIZE = 200
# The arms of `ptuning-v2`: one classifier (a linear head on [CLS], methods/ptuning_v2.py) with the prompt
# at every layer, at the input only, or absent, and the encoder frozen or trained. --methods takes these names.
CLASSIFIER_ARMS = {
    "ptuning-v2": Arm("ptuning-v2"),                                                       # deep prompts, frozen encoder
    "prompt": Arm("ptuning-v2", {"prompt_depth": "input"}),                                # shallow prompt tuning (Lester et al.)
    # encoder + head: the grid is centred on BERT's usual fine-tuning rate, not the prompts' rate
    "finetune": Arm("ptuning-v2", {"prompt_depth": "none", "tune_encoder": True, "lr": 5e-5}),
    "probe": Arm("ptuning-v2", {"prompt_depth": "none"}),                                  # the head alone on frozen features
}

CATALOGUE: dict[str, ExperimentSpec] = {
    "low-data": ExperimentSpec(
        "§6.3: prefix length 6, batch 10, init from the task's name, at each low-data size",
        "e2e", SMOLLM, ("prefix", "finetune", "adapter", "lora"), sizes=Sizes.SCALE,
        options={"batch_size": 10}, prompt_options=LOW_DATA_OPTIONS, group_by=("label", "train_size"), x="train_size"),
    "extrapolation": ExperimentSpec(
        "§6.4: train on seen WebNLG categories, evaluate seen vs unseen",
        "webnlg2017", SMOLLM, ("prefix", "finetune", "adapter"), sizes=Sizes.WHOLE_SPLIT,
        plan={"exclude_categories": UNSEEN_WEBNLG},
        notes=(f"held out of training: {', '.join(UNSEEN_WEBNLG)} (WebNLG 2017 dev split evaluated)",)),
    "prefix-length": ExperimentSpec(
        "§7.1: prefix length", "e2e", SMOLLM, ("prefix",),
        axis=Axis("length", Per((1, 5, 10, 20), scale={"paper": (1, 5, 10, 20, 40), "tiny": (1, 10)})),
        label="{arm}-{length}", group_by=("label", "length"), x="length", reference="prefix-10"),
    "embedding-only": ExperimentSpec(
        "§7.2: EMB-1/10/20 (soft input embeddings only) vs the prefix", "e2e", SMOLLM, ("prompt", "prefix"),
        axis=Axis("length", Per((10,), arm={"prompt": (1, 10, 20)})),
        label=Per("{arm}-{length}", arm={"prompt": "EMB-{length}"}), reference="prefix-10"),
    "infix": ExperimentSpec(
        "§7.3: [x; INFIX; y] vs [PREFIX; x; y] at equal length", "e2e", SMOLLM, ("infix", "prefix"),
        axis=Axis("length", (10,)), label="{arm}-{length}", reference="prefix-10"),
    "init": ExperimentSpec(
        "§7.4: random vs task words vs irrelevant words, in low data", "e2e", SMOLLM, ("prefix",),
        sizes=Sizes.SCALE, options={"length": 6, "batch_size": 10},
        axis=Axis("init", ("random", "table-to-text:", "elephant"),
                  options={"random": {"init": "random"}, "table-to-text:": {"init": "text", "init_text": "table-to-text:"},
                           "elephant": {"init": "text", "init_text": "elephant"}}),
        label="init={init}", group_by=("label", "train_size"), x="train_size", reference="init=table-to-text:"),
    "ptuning-v2": ExperimentSpec(
        "deep prompts vs shallow prompt tuning vs fine-tuning on BoolQ, accuracy", "boolq", "minilm-l6",
        tuple(CLASSIFIER_ARMS), arms=CLASSIFIER_ARMS, arms_are="classifiers",
        notes=("BoolQ: accuracy on {classifier_eval} held-out questions; arms: the ptuning-v2 classifier "
               "with deep prompts, input-only prompts (prompt), no prompt and the encoder trained (finetune), "
               "or the head alone (probe)",),
        reference="ptuning-v2"),
    # every registered generation method on one budget, each at its own chosen learning rate (docs/methods.md)
    "methods": ExperimentSpec(
        "every generation method at one training size", "e2e", SMOLLM, None,
        sizes=Per((METHOD_TABLE_SIZE,), scale={"tiny": Sizes.FIRST}),
        options={"batch_size": 10}, prompt_options=METHOD_TABLE_OPTIONS, group_by=("label", "train_size")),
}
# Image experiments (linear probes, VPT vs baselines, L2P on split CIFAR-10): run by vision/, to
# which `prefixtune experiment` hands them (images have their own data path); docs/vision.md
VISION_EXPERIMENTS = ("probe", "vpt", "l2p")
EXPERIMENTS = tuple(CATALOGUE) + VISION_EXPERIMENTS

# Where training sets are sampled from when the data here has no separate training split: the
# shared E2E and BoolQ are their dev splits only (see ../shared/data/README.md; BoolQ's loader carves
# its small train/dev/test parts from that file, the sweep samples from all of it); jsonl files are "all".
_SAME_SPLIT = {"e2e": "dev", "boolq": "all", "jsonl": "all", "xsum": "validation"}
# "Full data" where the only split here is a dev split (E2E 4,672 pairs, BoolQ 3,270): train on this
# many pairs, the rest gives the dev loss and evaluation.
SAME_SPLIT_FULL = 2500


# ---------------------------------------------------------------------------------------------
# The one builder


def build(name: str, scale: str = "quick", model: str | None = None, dataset: str | None = None,
          data_dir: str | None = None, path: str | None = None, methods=None, seeds=None,
          sizes=None, bf16: bool = False) -> Experiment:
    """The catalogue's experiment `name` at `scale`. `seeds`/`sizes` replace the scale's (a subset now,
    more later: completed runs are skipped)."""
    if name not in CATALOGUE:
        raise ExperimentError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return build_runs(name, CATALOGUE[name], scale, model=model, dataset=dataset, data_dir=data_dir, path=path,
                      methods=methods, seeds=seeds, sizes=sizes, bf16=bf16)


def build_runs(name: str, spec: ExperimentSpec, scale: str = "quick", model: str | None = None,
               dataset: str | None = None, data_dir: str | None = None, path: str | None = None, methods=None,
               seeds=None, sizes=None, bf16: bool = False) -> Experiment:
    """The runs of `spec` at `scale`: for every arm, axis value, training size and seed, one RunSpec."""
    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    from ..methods import METHODS, get_method  # torch: `report` reads Experiment without it

    dataset, model = dataset or spec.dataset, model or spec.model
    arms = tuple(methods) if methods else (
        spec.methods if spec.methods is not None else tuple(n for n, cls in METHODS.items() if cls.generates))
    _check_available(name, spec, dataset, arms)
    s = _scale(SCALES[scale], dataset, seeds, sizes)
    train = {k: v for k, v in (("max_steps", s.max_steps), ("epochs", s.epochs), ("eval_every", s.eval_every),
                                ("patience", s.patience), ("warmup_steps", s.warmup_steps)) if v is not None}
    if bf16:  # only when asked: fp32 rows keep the ids and settings they were recorded with
        train["bf16"] = True
    decode = {"num_beams": s.num_beams, "max_new_tokens": s.max_new_tokens}
    runs: list[RunSpec] = []
    for arm in arms:
        method, arm_options = _arm(spec, arm)
        # a classifier is scored with one forward pass per question: many more of them than generation sources
        eval_limit = s.classifier_eval if get_method(method).kind == "classifier" else s.eval_limit
        for value in (_resolve(spec.axis.values, scale, arm) if spec.axis else (None,)):
            axis = {spec.axis.name: value} if spec.axis else {}
            label = _resolve(spec.label, scale, arm).format(arm=arm, method=method, **axis)
            options = {**spec.options, **_options_it_has(method, spec.prompt_options), **arm_options,
                       **(spec.axis.options_for(value) if spec.axis else {})}
            for size in _sizes(spec, s, scale, dataset):
                for seed in s.seeds:
                    runs.append(_run(dataset, method, label, size, seed, {**train, "seed": seed, **options}, s,
                                     plan=_plan(dataset, data_dir, path, size, seed, **spec.plan), decode=decode,
                                     eval_limit=eval_limit, labels=axis))
    notes = [scale_note(scale, s)] + [n.format(**{k: "all" if v is None else v for k, v in dataclasses.asdict(s).items()})
                                       for n in spec.notes]
    return Experiment(name, scale, model, dataset, runs, spec.group_by, x=spec.x, notes=notes,
                      reference=spec.reference, sizes=list(s.sizes), seeds=list(s.seeds))


def _run(dataset: str, method: str, label: str, size: int | None, seed: int, overrides: dict, s: Scale, *,
         plan: dict, decode: dict, eval_limit: int | None, labels: dict) -> RunSpec:
    if size and _needs_size(dataset):  # the dev loss uses 30% of the training size in pairs (paper §6.3)
        overrides["dev_max_examples"] = max(2, math.ceil(0.3 * size))
    # options a method does not have (lengths and init of the soft-prompt family) are not passed to it
    overrides = {k: v for k, v in overrides.items() if k in _option_names(method)}
    if "lr" not in overrides:  # the rate the learning-rate grid is centred on (the protocol's rule)
        overrides["lr"] = centre_learning_rate(dataset, method, s.short_run)
    group = "-".join(str(p) for p in (label, f"n{size}" if size else "full"))
    return RunSpec(id=f"{group}-s{seed}", method=method, dataset=dataset, plan=plan, overrides=overrides,
                   decode=decode, eval_limit=eval_limit, labels={"label": label, **labels}, group=group)


def _arm(spec: ExperimentSpec, arm: str) -> tuple[str, dict]:
    """(method trained, its options) of the arm named `arm`."""
    if spec.arms is None:
        return arm, {}
    return spec.arms[arm].method, dict(spec.arms[arm].options)


def _scale(s: Scale, dataset: str, seeds, sizes) -> Scale:
    """The scale with the seeds/sizes asked for, and a full-data size where the data has no training split."""
    for what, values, least in (("seeds", seeds, 0), ("sizes", sizes, 1)):
        if values is None:
            continue
        values = tuple(values)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < least for v in values):
            raise ExperimentError(f"--{what} must be integers >= {least}, got {list(values)}")
        s = dataclasses.replace(s, **{what: tuple(dict.fromkeys(values))})
    if s.full_size is None and _needs_size(dataset):  # no training split here: sample a large part of the one split
        s = dataclasses.replace(s, full_size=SAME_SPLIT_FULL)
    return s


def _sizes(spec: ExperimentSpec, s: Scale, scale: str, dataset: str) -> tuple:
    sizes = _resolve(spec.sizes, scale)
    if sizes is Sizes.SCALE:
        return s.sizes
    if sizes is Sizes.FIRST:
        return s.sizes[:1]
    if sizes is Sizes.FULL:
        return (s.full_size,)
    if sizes is Sizes.WHOLE_SPLIT:
        return (s.full_size if _needs_size(dataset) else None,)
    return tuple(sizes)


def scale_note(scale: str, s: Scale) -> str:
    return (f"scale {scale}: sizes {list(s.sizes)}, seeds {list(s.seeds)}, "
            f"{'max ' + str(s.max_steps) + ' steps' if s.max_steps else 'recipe epochs'}, "
            f"{'epochs ' + str(s.epochs) + ', ' if s.epochs else ''}"
            f"{str(s.eval_limit) + ' evaluation sources spread over the split (half unseen where marked)' if s.eval_limit else 'all evaluation sources'}, beam {s.num_beams}"
            + (", learning-rate grids centred on each method's short-run rate" if s.short_run else "")
            + (f"; early stopping: dev loss every {s.eval_every} steps, patience {s.patience}" if s.patience else ""))


def _check_available(name: str, spec: ExperimentSpec, dataset: str, arms) -> None:
    from ..methods import METHODS  # torch: `report` reads Experiment without it

    if spec.arms is not None:
        unknown = [a for a in arms if a not in spec.arms]
        if unknown:
            raise ExperimentError(f"experiment {name!r} compares {spec.arms_are} {', '.join(spec.arms)}; "
                                  f"unknown: {', '.join(unknown)}")
    methods = tuple(dict.fromkeys(_arm(spec, a)[0] for a in arms))
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


def _options_it_has(method: str, options: Mapping) -> dict:
    """The subset of `options` that `method`'s config has (soft-prompt sizes and init); an `init_text`
    comes with init='text' where the method also has an `init` option."""
    from ..methods import get_method  # torch: `report` reads Experiment without it

    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    out = {k: v for k, v in options.items() if k in fields}
    if "init_text" in out and "init" in fields:
        out["init"] = "text"
    return out


def _option_names(method: str) -> set[str]:
    from ..methods import get_method  # torch: `report` reads Experiment without it
    from ..train import TrainConfig  # imports torch, as above

    return ({f.name for f in dataclasses.fields(get_method(method).config_class)} |
            {f.name for f in dataclasses.fields(TrainConfig)})


def _needs_size(dataset: str) -> bool:
    return canonical(dataset) in _SAME_SPLIT
