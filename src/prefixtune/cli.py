"""The `prefixtune` command: a thin layer that parses arguments and calls the library.

Each command's settings are options generated from its config dataclass (cli_options.py): the option is
the field's name with dashes. Everything that imports torch is imported inside the command that needs it,
so that `prefixtune --help` and a command's `--help` start fast."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import tempfile
import unicodedata
from functools import cache
from pathlib import Path
from typing import Optional

import typer

from .cli_options import (LaterOptionsGroup, config_from, fields_of, options, options_later, split_values,
                          told_with_its_option, with_options)
from .config import ConfigError, TrainConfig
from .data_plan import DataPlan
from .decode_config import DecodeConfig, decode_config_for
from .files import PrefixFileError
from .methods.registry import DEFAULT_METHOD, config_class, config_classes  # torch-free: classes load on use
from .plots import plot_run  # matplotlib is imported only when a plot is drawn
from .progress import count_progress, decoding_progress, on_terminal, progress_print, training_progress
from .recipes import configs_for, recipe_for  # torch-free: the methods are imported only when a config is built
from .experiments.config import ExperimentConfig
from .serve.config import ServeConfig
from .serve.store_errors import StoreError
from .serve.store_sql import copy_store  # sqlite3 only: the store that reads prefix files (torch) stays local

app = typer.Typer(help="Prefix-tuning for frozen Hugging Face LMs: train, generate, evaluate, score, serve.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=LaterOptionsGroup)
prefixes_app = typer.Typer(help="Manage the prefixes in the prefix store.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys of the server.", no_args_is_help=True)
app.add_typer(prefixes_app, name="prefixes")
app.add_typer(keys_app, name="keys")
STORE_HELP = "Prefix store: a SQLite file, or postgresql://user@host[:port]/db shared by replicas."
FILES_DIR_HELP = ("Folder of the prefix files (default: <store>-files beside a SQLite file; for PostgreSQL the "
                  "folder recorded when the store was first opened). Replicas share it.")


def one_line(message: str) -> str:
    """`message` on one line: control characters and line separators (which a path or value given by
    the user may hold) are written as escapes."""
    return "".join(c if c == " " or (c.isprintable() and unicodedata.category(c) not in ("Zl", "Zp"))
                   else repr(c)[1:-1] for c in str(message))


def _fail(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def _check_writable_folder(option: str, folder: Path) -> None:
    """Fail now (not after the model load) if `folder` cannot be created or written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _fail(f"--{option} {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".prefixtune-write-check-", dir=existing)
    except OSError as e:
        _fail(f"--{option} {folder}: cannot write in {existing} ({e.strerror})")
    os.close(fd)
    os.unlink(probe)


@cache
def _method_fields():
    """train's options: TrainConfig's and every method config's fields, with the labels of their owners
    (torch-free: the registry names config classes without importing the methods)."""
    methods = config_classes()
    labels = {cls: name for name, cls in methods.items()}
    labels[TrainConfig] = "train"
    classes = [TrainConfig] + list(dict.fromkeys(methods.values()))
    return fields_of(*classes), (lambda c: labels.get(c, c.__name__))


# train's data plan: its seed is TrainConfig's (one seed per run); it evaluates nothing (no eval_size)
_TRAIN_DATA = fields_of(DataPlan, exclude=("seed", "eval_size"))


def _method_asked_for_help(args: list[str]) -> str | None:
    """`train --method NAME --help` (a registered NAME): the method whose options alone the help lists."""
    if "--help" not in args:
        return None
    for i, arg in enumerate(args):
        name = arg.partition("=")[2] if arg.startswith("--method=") else (
            args[i + 1] if arg == "--method" and i + 1 < len(args) else None)
        if name is not None:
            return name.lower() if name.lower() in config_classes() else None
    return None


def _train_options(args: list[str] = ()) -> list[inspect.Parameter]:
    """train's generated options: the method (its default from the registry), the data plan's, the methods'
    and training's; generated when train runs or shows its help. `--method NAME --help` lists only that
    method's and training's (every method's options make a long page)."""
    method = inspect.Parameter("method", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        DEFAULT_METHOD, help="Method: see `prefixtune methods`; `--method NAME --help` lists its options only."))
    fields, label = _method_fields()
    shown = _method_asked_for_help(list(args))
    if shown is not None:
        fields = fields_of(TrainConfig, config_class(shown))
    return [method, *options(_TRAIN_DATA, label=lambda cls: "", show_defaults=True), *options(fields, label)]


def train(
    model: str = typer.Option("smollm2-135m", help="Short name, local folder or Hub id of the frozen base model."),
    out: Path = typer.Option(..., help="Output folder: METHOD.safetensors, checkpoint.safetensors, log.jsonl, run.json."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors (same settings only)."),
    precision: str = typer.Option("auto", help="auto (fp32 or bf16, whichever runs faster on this machine: a "
                                  "step-shaped workload, and where it is within 2x the run's own training step; "
                                  "measured once, cached), fp32 or bf16. --bf16/--no-bf16 wins."),
    **settings,
):
    """Train any method (prefix, infix, prompt, ptuning, ... see `prefixtune methods`) on a frozen LM.

    Options marked (name) belong to that method's config, (train) to training; the others choose the data.
    Defaults come from the dataset's recipe (the paper's values for prefix-tuning)."""
    fields, label = _method_fields()
    method = settings["method"].lower()
    given = split_values(settings, fields)
    allowed = {f.name for f in dataclasses.fields(config_class(method))} | {f.name for f in dataclasses.fields(TrainConfig)}
    for name in given:
        if name not in allowed:
            owners = ", ".join(label(c) for c in fields[name]["owners"])
            _fail(f"--{name.replace('_', '-')} is not an option of method {method!r} (it belongs to {owners})")
    plan = config_from(DataPlan, split_values(settings, _TRAIN_DATA))  # the data options, checked first

    from .experiments import run_training  # torch: only when a command runs (start-up time)
    from .models import check_model_name  # torch: only when a command runs (start-up time)

    try:
        method_cfg, train_cfg = configs_for(plan.dataset, method, **given)
    except ConfigError as e:
        raise told_with_its_option(e, config_class(method), TrainConfig) from None
    plan = dataclasses.replace(plan, seed=train_cfg.seed)  # one seed per run: the training's
    check_model_name(model)
    # a CPU flag is not a measurement: bf16 autocast can be 2-20x slower on a CPU. --bf16/--no-bf16 wins; else
    # --precision decides, once the data is checked
    with training_progress() as progress:
        result = run_training(model, plan, method_cfg, train_cfg, out, resume=resume, progress=progress,
                              print_fn=progress_print, precision=None if "bf16" in given else precision)
    typer.echo(f"saved {result['artifact_path']} after {result['steps']} steps (best dev loss "
               f"{result['best_dev_loss']:.4f}; {result['trainable_params']:,} trainable parameters)")


app.command()(options_later(train, _train_options))


@app.command()
def methods():
    """List the methods, what each trains, and its options."""
    from .methods import METHODS  # torch: the methods import it; only when a command runs (start-up time)

    for name, cls in METHODS.items():
        opts = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls.config_class) if f.metadata.get("cli", True)]
        typer.echo(f"{name:<11} {cls.summary}\n{'':<11} options: {' '.join(opts) or '(none)'}"
                   f"{'' if cls.mixable else '  [changes weights: not mixable per row, not served]'}")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        _fail(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as UTF-8")
    except OSError as e:
        _fail(f"{path}: cannot read ({e.strerror})")


_DECODE = fields_of(DecodeConfig)


def generate(
    prefix: list[Path] = typer.Option([], "--prefix", "--artifact", help="Artifact file of any method (none: the "
                                      "bare model). Repeat for an ensemble of soft prompts/prefixes."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the artifact file names)."),
    input: list[str] = typer.Option([], "--input", help="Source text; repeat for several."),
    input_file: Optional[Path] = typer.Option(None, help="File with one source per line (UTF-8)."),
    **decoding,
):
    """Generate outputs for sources with a trained artifact (or an ensemble of them).

    Decoding options not given take DecodeConfig's defaults (beam 5, at most 60 new tokens)."""
    from .decode import generate_texts  # torch: only when a command runs (start-up time)
    from .ensemble import ensemble_decode_config  # torch: only when a command runs (start-up time)
    from .runs import check_artifact_files, load_for_decoding  # torch: only when a command runs (start-up time)

    cfg = ensemble_decode_config(config_from(DecodeConfig, split_values(decoding, _DECODE)), len(prefix))
    sources = list(input) + (_read_lines(input_file) if input_file else [])
    if not sources:
        _fail("give --input TEXT or --input-file FILE")
    check_artifact_files(prefix)
    loaded, base, tok = load_for_decoding(prefix, model)
    with decoding_progress(len(sources)) as progress:
        texts = generate_texts(base, tok, sources, loaded, cfg, progress=progress)
    for text in texts:
        typer.echo(text)


app.command()(with_options(generate, options(_DECODE, label=lambda cls: "", show_defaults=True)))


# evaluate's data plan: one split (train_split follows eval_split), no training sample of its own to shape
_EVAL_DATA = fields_of(DataPlan, exclude=("train_split", "dev_sources", "exclude_categories"))


def evaluate(
    prefix: list[Path] = typer.Option(..., "--prefix", "--artifact", help="Artifact file to evaluate (any method); "
                                      "repeat for an ensemble."),
    out: Path = typer.Option(..., help="Folder for metrics.json and predictions.jsonl."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the artifact file names)."),
    model_based: bool = typer.Option(False, help="Also BERTScore, when the bert-score package and weights exist."),
    **settings,
):
    """Generate for every evaluation source and score with the official metrics.

    Decoding options not given come from the dataset's recipe (paper §5.3: beam 5; beam 6 and length
    penalty 0.8 for XSum)."""
    from .ensemble import ensemble_decode_config  # torch: only when a command runs (start-up time)
    from .experiments import evaluate as run_eval  # torch: only when a command runs (start-up time)
    # sacrebleu, numpy: the metrics package imports them; only when a command runs (start-up time)
    from .metrics import format_table
    # torch: only when a command runs (start-up time)
    from .runs import check_artifact_files, evaluation_items, evaluation_plan, image_classifier, load_for_decoding

    data = split_values(settings, _EVAL_DATA)
    plan = config_from(DataPlan, data)  # the data options, checked before any file is read
    _check_writable_folder("out", out)
    check_artifact_files(prefix)
    task = recipe_for(plan.dataset).metric
    cfg = ensemble_decode_config(config_from(DecodeConfig, split_values(settings, _DECODE),
                                             base=decode_config_for(plan.dataset)), len(prefix))
    plan = evaluation_plan(prefix[0], plan, given=data)
    items = evaluation_items(plan)
    loaded, base, tok = load_for_decoding(prefix, model)
    if image_classifier(loaded):
        from .vision_cli import evaluate_image_artifact  # torch: only for an image classifier (start-up time)

        evaluate_image_artifact(base, tok, loaded, items, out, plan.dataset, plan.eval_split)
        return
    with decoding_progress(len(items)) as progress:
        result = run_eval(base, tok, loaded, items, task, cfg, out, model_based=model_based, progress=progress)
    typer.echo(f"{plan.dataset} {plan.eval_split}: {len(items)} sources, beam {cfg.num_beams}, "
               f"{result['decode_seconds']} s")
    typer.echo(format_table(result["scores"]))
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    for group in ("seen", "unseen"):
        if f"scores_{group}" in result:
            typer.echo(f"\n{group} categories:\n" + format_table(result[f"scores_{group}"]))
    typer.echo(f"\nwrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


app.command()(with_options(evaluate, options(_EVAL_DATA, label=lambda cls: "", show_defaults=True,
                                                       command="evaluate")
                           + options(_DECODE, label=lambda cls: "")))  # decoding defaults: the recipe's


@app.command()
def score(
    task: str = typer.Option(..., help="e2e, webnlg, dart, xsum, or generic."),
    hyp: Path = typer.Option(..., help="System outputs, one per line."),
    refs: Path = typer.Option(..., help="References, one per line, a blank line between items."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
):
    """Score any system's outputs with the official metrics."""
    # sacrebleu, numpy: the metrics package imports them; only when a command runs (start-up time)
    from .metrics import format_table, read_hyps, read_refs, score as compute

    try:
        result = compute(task, read_hyps(hyp), read_refs(refs))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result) if as_json else format_table(result))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with e2e/ (default: ../shared/data if present, else download)."),
    steps: int = typer.Option(100, help="Most training steps, batches of 5 (early stopping on the dev loss; no time limit, so the result does not depend on the machine's speed)."),
    time_budget: Optional[float] = typer.Option(None, help="Opt-in: stop training after this many minutes (the "
                                                "result then depends on the machine's speed)."),
    train_size: int = typer.Option(200, help="Training pairs sampled from E2E."),
    eval_size: int = typer.Option(60, help="Evaluation MRs (never trained on)."),
    num_beams: int = typer.Option(1, help="Beam width for both systems (1 = greedy)."),
    record: Optional[Path] = typer.Option(None, help="Also write the summary (metrics, times, machine) as "
                                          "RECORD/DATE-HHMM-CPU.json (`make demo` records into results/demo)."),
):
    """Prefix-tune SmolLM2-135M-Instruct on 200 E2E pairs and compare with zero-shot prompting."""
    from .demo import run_demo  # torch: only when a command runs (start-up time)

    if record is not None:
        _check_writable_folder("record", record)
    run_demo(out=out, data_dir=data_dir, steps=steps, minutes=time_budget, train_size=train_size, eval_size=eval_size,
             num_beams=num_beams, record_dir=record)


_SERVE = fields_of(ServeConfig)


def serve(
    model: str = typer.Option("smollm2-135m", help="Base model served (short name, folder or Hub id)."),
    store: str = typer.Option("prefixes.db", help=STORE_HELP + " Created if missing."),
    files_dir: Optional[Path] = typer.Option(None, help=FILES_DIR_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    **settings,
):
    """Serve completions for many users' prefixes from one frozen model (OpenAI-style HTTP API).

    Every ServeConfig setting is an option (docs/serving.md#settings)."""
    from .models import check_model_name  # torch: only when a command runs (start-up time)
    from .serve import run_server  # torch, FastAPI: only when a command runs (start-up time)

    config = config_from(ServeConfig, split_values(settings, _SERVE))
    check_model_name(model)
    run_server(model, store, host=host, port=port, config=config, files_dir=files_dir)  # opens the store first


app.command()(with_options(serve, options(_SERVE, label=lambda cls: "", show_defaults=True)))


def _store(location: str, model_name: Optional[str] = None, files_dir: Optional[Path] = None):
    from .serve import PrefixStore  # torch: the store reads prefix files; only when a command runs (start-up time)

    model = None
    if model_name:
        from .models import load_model  # torch: only when a command runs (start-up time)

        model = load_model(model_name)[0]
    return PrefixStore(location, model=model, files_dir=files_dir)


@prefixes_app.command("add")
def prefixes_add(
    name: str = typer.Argument(..., help="Name clients use as `model` in completions."),
    file: Path = typer.Argument(..., help="Prefix file (.safetensors) saved by prefixtune."),
    owner: str = typer.Option(..., help="Owner of the prefix (an API key's owner)."),
    public: bool = typer.Option(False, help="Let every key use it (only the owner can delete it)."),
    store: str = typer.Option("prefixes.db", help=STORE_HELP),
    model: Optional[str] = typer.Option(None, help="Also check shapes and fingerprint against this base model."),
    files_dir: Optional[Path] = typer.Option(None, help=FILES_DIR_HELP),
):
    """Add a prefix file to the store (checked, copied in, sha256 recorded)."""
    try:
        record = _store(store, model, files_dir).add(name, owner, file, public=public)
    except (PrefixFileError, StoreError) as e:
        _fail(str(e))
    typer.echo(json.dumps(record.to_dict()))


@prefixes_app.command("list")
def prefixes_list(
    store: str = typer.Option("prefixes.db", help=STORE_HELP),
    owner: Optional[str] = typer.Option(None, help="Only what this owner may use (default: everything)."),
):
    """List prefixes in the store."""
    for record in _store(store).list(owner):
        d = record.to_dict()
        typer.echo(f"{d['name']:<24} owner={d['owner']:<12} {'public ' if d.get('public') else 'private'} "
                   f"len={d.get('length')} {d.get('size_bytes')} B base={d.get('base_model')}")


@prefixes_app.command("show")
def prefixes_show(name: str = typer.Argument(...), store: str = typer.Option("prefixes.db", help=STORE_HELP)):
    """Show every record named NAME."""
    records = _store(store).find(name)
    if not records:
        _fail(f"no prefix named {name!r} in the store")
    for record in records:
        typer.echo(json.dumps(record.to_dict(), indent=2))


@prefixes_app.command("rm")
def prefixes_rm(
    name: str = typer.Argument(...),
    owner: str = typer.Option(..., help="Owner of the prefix."),
    store: str = typer.Option("prefixes.db", help=STORE_HELP),
):
    """Remove a prefix: it is never served again."""
    try:
        record = _store(store).remove(name, owner)
    except StoreError as e:
        _fail(str(e))
    typer.echo(f"removed {record.name}")


@keys_app.command("add")
def keys_add(owner: str = typer.Argument(...), store: str = typer.Option("prefixes.db", help=STORE_HELP)):
    """Create an API key for OWNER; the key is the last word printed (only its hash is stored)."""
    from .serve.store import check_owner  # torch: the store reads prefix files (start-up time)

    check_owner(owner)  # before the store is created or touched
    key = _store(store).add_key(owner)
    typer.echo(f"new key for {owner} (shown once): {key}")


@keys_app.command("rm")
def keys_rm(key: str = typer.Argument(..., help="The key or its id."), store: str = typer.Option("prefixes.db", help=STORE_HELP)):
    """Revoke an API key."""
    if not _store(store).remove_key(key):
        _fail("no such key")
    typer.echo("removed")


@keys_app.command("list")
def keys_list(owner: Optional[str] = typer.Option(None), store: str = typer.Option("prefixes.db", help=STORE_HELP)):
    """List key ids and owners (never the keys)."""
    for k in _store(store).list_keys(owner):
        typer.echo(f"{k.key_id}  owner={k.owner}")


# -- prefixtune store: schema migrations and copies between backends (issue 12) -----------------------

store_app = typer.Typer(help="Prefix store operations: schema migrations, copies between SQLite and PostgreSQL.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("migrate")
def store_migrate(
    store: str = typer.Argument(..., help=STORE_HELP),
    files_dir: Optional[Path] = typer.Option(None, help=FILES_DIR_HELP),
):
    """Bring the store's schema up to date (servers also do this on start; safe to run while they serve)."""
    try:
        opened = _store(store, files_dir=files_dir)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    before, after = opened.migrated
    typer.echo(f"{opened.backend.location}: schema version {before} -> {after}" if before != after else
               f"{opened.backend.location}: schema version {after}, up to date")
    opened.close()


@store_app.command("copy")
def store_copy(
    src: str = typer.Argument(..., help="Store to copy from (SQLite file or postgresql:// URL)."),
    dst: str = typer.Argument(..., help="Empty store to copy into (created if missing)."),
    src_files_dir: Optional[Path] = typer.Option(None, help="SRC's files folder. " + FILES_DIR_HELP),
    dst_files_dir: Optional[Path] = typer.Option(None, help="DST's files folder (required for a new PostgreSQL store)."),
):
    """Copy every prefix (file and row, ids kept, sha256 checked) and API key from SRC into the empty store DST."""
    try:
        source, target = _store(src, files_dir=src_files_dir), _store(dst, files_dir=dst_files_dir)
        prefixes, keys = copy_store(source, target)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"copied {prefixes} prefixes and {keys} API keys from {source.backend.location} to "
               f"{target.backend.location} (files in {target.files_dir})")


def user_error_message(e: BaseException) -> str | None:
    """One line for a user's mistake (bad name, path, data, settings, file); None for a bug."""
    # numpy: the data package imports it; only when a command has failed (`prefixtune --help` start-up time)
    from .data import DataError, MissingDataError
    from .data.fetch import DownloadError  # numpy, as above: only when a command has failed (start-up time)
    from .train import TrainingError  # torch: only when a command has failed (start-up time)
    from .metrics.java import JavaMissing  # pycocoevalcap: only when a command has failed (start-up time)

    if isinstance(e, StoreError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte {e.start}); save it as UTF-8"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    if isinstance(e, (ConfigError, DataError, MissingDataError, DownloadError, PrefixFileError, TrainingError,
                      ValueError, FileNotFoundError, JavaMissing)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def main() -> None:
    """Entry point, the CLI's one error boundary: a user's mistake prints one `error: ...` line and
    exits 2; only a bug shows a traceback."""
    if not on_terminal():  # logs and CI: no progress-bar noise from transformers and the Hub. Their
        # setting is read when they are first imported: an environment variable (not their API) spares
        # `prefixtune --help` importing transformers (start-up time)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported (the CLI run in-process): tell it directly
            from transformers.utils import logging as hf_logging  # transformers: only when already imported

            hf_logging.disable_progress_bar()
    from typer._click import exceptions as click  # typer 0.29 vendors click (pinned in pyproject.toml)

    try:
        code = app(standalone_mode=False)  # usage errors come here, to be said in one line
    except click.NoArgsIsHelpError as e:  # `prefixtune keys`: the help is the answer
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:  # a wrong option, value or argument
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        typer.echo(f"error: {one_line(' '.join(e.format_message().split(' ')))}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        typer.echo(f"error: {one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(e)
        if message is None:
            raise
        typer.echo(f"error: {one_line(message)}", err=True)
        sys.exit(2)
    if isinstance(code, int) and code:  # typer.Exit(2) from a command (its error line is printed)
        sys.exit(code)



# ---------------------------------------------------------------------------------------------
# Experiments (the paper's sweeps) and loss plots. Kept as one block; `main` above is unchanged.

_EXPERIMENT = fields_of(ExperimentConfig)


def experiment(
    name: str = typer.Argument(..., help="low-data, extrapolation, prefix-length, embedding-only, infix, init, "
                               "ptuning-v2, methods; image experiments: probe, vpt, l2p"),
    out: Path = typer.Option(..., help="Experiment folder: runs/, results.jsonl, table.md, figure."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and exit."),
    **settings,
):
    """Run one of the paper's experiments as a resumable sweep of Ray tasks; writes rows, table, figure.
    Image experiments (probe, vpt, l2p: docs/vision.md) run in experiments/vision/. Every ExperimentConfig
    setting is an option."""
    from .experiments.command import experiment as run_experiment_command  # torch: only when it runs (start-up time)

    config = config_from(ExperimentConfig, split_values(settings, _EXPERIMENT))
    try:
        run_experiment_command(name, out, **{k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in dataclasses.asdict(config).items()},
                               dry_run=dry_run, print_fn=progress_print, progress_bar=count_progress)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


app.command()(with_options(experiment, options(_EXPERIMENT, label=lambda cls: "", show_defaults=True)))


@app.command()
def classify(
    artifact: Path = typer.Option(..., "--artifact", help="An image classifier's artifact (vpt, vpt-shallow, vpt-deep, "
                                  "l2p, coop, cocoop, dapl)."),
    image: list[Path] = typer.Option(..., "--image", help="Image file (any format Pillow reads); repeat for several."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the artifact file names)."),
    top: int = typer.Option(3, help="Labels shown per image, with their probabilities."),
):
    """Classify image files with a trained image classifier (prints the top labels per image)."""
    from .vision_cli import classify_files  # torch: only when a command runs (start-up time)

    if top < 1:
        _fail(f"--top must be at least 1, got {top}")
    if not artifact.is_file():
        _fail(f"--artifact {artifact}: no such file")
    try:
        classify_files(artifact, list(image), model, top)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A training run's --out folder (reads its log.jsonl)."),
         out: Optional[Path] = typer.Option(None, help="PNG file (default: RUN_DIR/loss.png)."),
         smooth: int = typer.Option(10, help="Moving-average window of the train curve, in steps.")):
    """Draw the train and dev loss curves of a run."""
    typer.echo(f"wrote {plot_run(run_dir, out, smooth=smooth)}")


@app.command()
def report(root: Path = typer.Option(Path("."), help="The repository root (docs/ and results/ beside it)."),
           check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if a doc's generated block "
                                      "differs from what its data generates.")):
    """Regenerate every results table in the docs (and every experiment's table and figures) from the
    committed data: results/<experiment>/ and bench/results/*.json."""
    # numpy: the report's tables import it; only when a command runs (`prefixtune --help` start-up time)
    from .experiments.report import ReportError, regenerate

    if not (root / "docs").is_dir():
        _fail(f"--root {root}: no docs/ folder there")
    try:
        changed = regenerate(root, check=check)
    except ReportError as e:
        _fail(str(e))
    if check and changed:
        typer.echo(f"out of date: {', '.join(changed)} (run `prefixtune report` to regenerate)", err=True)
        raise typer.Exit(1)
    typer.echo(("checked" if check else "regenerated") + f": {', '.join(changed) or 'nothing changed'}")


if __name__ == "__main__":
    main()
