"""The `prefixtune` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_options import fields_of, options, split_values, with_options
from .progress import decoding_progress, progress_print, training_progress

app = typer.Typer(help="Prefix-tuning for frozen Hugging Face LMs: train, generate, evaluate, score, serve.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
prefixes_app = typer.Typer(help="Manage the prefixes in the prefix store.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys of the server.", no_args_is_help=True)
app.add_typer(prefixes_app, name="prefixes")
app.add_typer(keys_app, name="keys")
STORE_HELP = "Prefix store: a SQLite file, or postgresql://user@host[:port]/db shared by replicas."
FILES_DIR_HELP = ("Folder of the prefix files (default: <store>-files beside a SQLite file; for PostgreSQL the "
                  "folder recorded when the store was first opened). Replicas share it.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _method_fields():
    from .methods import METHODS
    from .train import TrainConfig

    labels = {cls.config_class: name for name, cls in METHODS.items()}
    labels[TrainConfig] = "train"
    classes = [TrainConfig] + list(dict.fromkeys(cls.config_class for cls in METHODS.values()))
    return fields_of(*classes), (lambda c: labels.get(c, c.__name__))


_FIELDS, _LABEL = _method_fields()


def train(
    model: str = typer.Option("smollm2-135m", help="Short name, local folder or Hub id of the frozen base model."),
    dataset: str = typer.Option(..., help="e2e, webnlg, dart, xsum, boolq, or jsonl (with --path)."),
    out: Path = typer.Option(..., help="Output folder: METHOD.safetensors, checkpoint.safetensors, log.jsonl, run.json."),
    method: str = typer.Option("prefix", help="Method: see `prefixtune methods`."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the data (else $PREFIXTUNE_DATA or the cache)."),
    path: Optional[str] = typer.Option(None, help="The JSONL file, for --dataset jsonl."),
    train_split: str = typer.Option("train", help="Split to train on."),
    eval_split: str = typer.Option("dev", help="Split to take dev loss / evaluation sources from."),
    train_size: Optional[int] = typer.Option(None, help="Low-data: sample this many pairs (grouped by source)."),
    exclude_categories: Optional[str] = typer.Option(None, help="WebNLG: categories kept out of training "
                                                     "(comma-separated), e.g. to study unseen categories."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors (same settings only)."),
    precision: str = typer.Option("auto", help="auto (fp32 or bf16, whichever a step-shaped workload runs faster "
                                  "on this machine: measured once, cached), fp32 or bf16. --bf16/--no-bf16 wins."),
    **options,
):
    """Train any method (prefix, infix, prompt, ptuning, ... see `prefixtune methods`) on a frozen LM.

    Options marked (name) belong to that method's config, (train) to training. Defaults come from the
    dataset's recipe (the paper's values for prefix-tuning)."""
    from .experiments import DataPlan, run_training
    from .methods import get_method
    from .models import check_model_name
    from .recipes import configs_for

    cls = get_method(method)
    given = split_values(options, _FIELDS)
    allowed = {f.name for f in dataclasses.fields(cls.config_class)} | {f.name for f in dataclasses.fields(_train_config())}
    for name in given:
        if name not in allowed:
            owners = ", ".join(_LABEL(c) for c in _FIELDS[name]["owners"])
            _fail(f"--{name.replace('_', '-')} is not an option of method {cls.name!r} (it belongs to {owners})")
    method_cfg, train_cfg = configs_for(dataset, cls.name, **given)
    check_model_name(model)
    if "bf16" not in given:  # a CPU flag is not a measurement: bf16 autocast can be 2-20x slower on a CPU
        from .precision import resolve_bf16

        train_cfg = dataclasses.replace(train_cfg, bf16=resolve_bf16(precision, print_fn=progress_print))
    plan = DataPlan(dataset=dataset, data_dir=data_dir, train_split=train_split, eval_split=eval_split,
                    train_size=train_size, seed=train_cfg.seed, path=path,
                    exclude_categories=tuple(c.strip() for c in exclude_categories.split(",")) if exclude_categories else None)
    with training_progress() as progress:
        result = run_training(model, plan, method_cfg, train_cfg, out, resume=resume, progress=progress,
                              print_fn=progress_print)
    typer.echo(f"saved {result['artifact_path']} after {result['steps']} steps (best dev loss "
               f"{result['best_dev_loss']:.4f}; {result['trainable_params']:,} trainable parameters)")


def _train_config():
    from .train import TrainConfig

    return TrainConfig


app.command()(with_options(train, options(_FIELDS, _LABEL)))


@app.command()
def methods():
    """List the methods, what each trains, and its options."""
    from .methods import METHODS

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


@app.command()
def generate(
    prefix: list[Path] = typer.Option([], "--prefix", "--artifact", help="Artifact file of any method (none: the "
                                      "bare model). Repeat for an ensemble of soft prompts/prefixes."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the artifact file names)."),
    input: list[str] = typer.Option([], "--input", help="Source text; repeat for several."),
    input_file: Optional[Path] = typer.Option(None, help="File with one source per line (UTF-8)."),
    num_beams: int = typer.Option(5, help="Beam width (1 = greedy; ensembles decode greedily or by sampling)."),
    max_new_tokens: int = typer.Option(60, help="Most new tokens per output."),
    do_sample: bool = typer.Option(False, help="Sample instead of beam search."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
):
    """Generate outputs for sources with a trained artifact (or an ensemble of them)."""
    from .decode import DecodeConfig, generate_texts
    from .experiments import artifact_base_model, load_run_artifact
    from .models import check_model_name, load_model

    sources = list(input)
    if input_file:
        sources += _read_lines(input_file)
    if not sources:
        _fail("give --input TEXT or --input-file FILE")
    if len(prefix) > 1 and num_beams > 1 and not do_sample:
        num_beams = 1  # an ensemble decodes greedily
    cfg = DecodeConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_p=top_p)
    if prefix:
        for p in prefix:
            if model is None and not artifact_base_model(p):
                _fail(f"{p} does not name its base model; pass --model")
        check_model_name(model or artifact_base_model(prefix[0]))
        loaded, base, tok = load_run_artifact(prefix, model)
    else:
        if not model:
            _fail("give --prefix or --model")
        check_model_name(model)
        (base, tok), loaded = load_model(model), None
    with decoding_progress(len(sources)) as progress:
        texts = generate_texts(base, tok, sources, loaded, cfg, progress=progress)
    for text in texts:
        typer.echo(text)


@app.command()
def evaluate(
    prefix: list[Path] = typer.Option(..., "--prefix", "--artifact", help="Artifact file to evaluate (any method); "
                                      "repeat for an ensemble."),
    dataset: str = typer.Option(..., help="e2e, webnlg, dart, xsum, or jsonl."),
    out: Path = typer.Option(..., help="Folder for metrics.json and predictions.jsonl."),
    split: str = typer.Option("dev", help="Split to evaluate on."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the data."),
    path: Optional[str] = typer.Option(None, help="The JSONL file, for --dataset jsonl."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the artifact file names)."),
    train_size: Optional[int] = typer.Option(None, help="For low-data runs trained on this split: the same --train-size "
                                             "and --seed exclude the trained sources (default: read from run.json)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the low-data sample."),
    eval_size: Optional[int] = typer.Option(None, help="Evaluate at most this many sources."),
    num_beams: Optional[int] = typer.Option(None, help="Beam width (paper: 5; 6 for XSum)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Most new tokens per output."),
    model_based: bool = typer.Option(False, help="Also BERTScore, when the bert-score package and weights exist."),
):
    """Generate for every evaluation source and score with the official metrics."""
    from .decode import decode_config_for
    from .experiments import DataPlan, artifact_base_model, evaluate as run_eval, load_run_artifact, plan_data
    from .metrics import format_table
    from .models import check_model_name
    from .recipes import recipe_for

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file, not a folder")
    task = recipe_for(dataset).metric
    run_json = prefix[0].parent / "run.json"
    run = json.loads(run_json.read_text()) if run_json.exists() else {}
    trained = run.get("data", {})
    same_split = trained.get("dataset") == dataset and trained.get("train_split") == split
    if train_size is None and same_split:
        train_size = trained.get("train_size")
    if seed is None:
        seed = trained.get("seed", 0) if same_split else 0
    plan = DataPlan(dataset=dataset, data_dir=data_dir, train_split=split if train_size else "train", eval_split=split,
                    train_size=train_size, seed=seed, eval_size=eval_size, path=path)
    if train_size:
        _, _, items = plan_data(plan)
    else:
        from .data import load_dataset

        items = load_dataset(dataset, split, data_dir=data_dir, **({"path": path} if path else {})).eval_items()
        items = items[:eval_size] if eval_size else items
    for p in prefix:
        if model is None and not artifact_base_model(p):
            _fail(f"{p} does not name its base model; pass --model")
    check_model_name(model or artifact_base_model(prefix[0]))
    loaded, base, tok = load_run_artifact(prefix, model)
    cfg = decode_config_for(dataset, num_beams=num_beams, max_new_tokens=max_new_tokens)
    if isinstance(loaded, list) and not cfg.do_sample:
        cfg.num_beams = 1  # an ensemble decodes greedily
    with decoding_progress(len(items)) as progress:
        result = run_eval(base, tok, loaded, items, task, cfg, out, model_based=model_based, progress=progress)
    typer.echo(f"{dataset} {split}: {len(items)} sources, beam {cfg.num_beams}, {result['decode_seconds']} s")
    typer.echo(format_table(result["scores"]))
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    for group in ("seen", "unseen"):
        if f"scores_{group}" in result:
            typer.echo(f"\n{group} categories:\n" + format_table(result[f"scores_{group}"]))
    typer.echo(f"\nwrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


@app.command()
def score(
    task: str = typer.Option(..., help="e2e, webnlg, dart, xsum, or generic."),
    hyp: Path = typer.Option(..., help="System outputs, one per line."),
    refs: Path = typer.Option(..., help="References, one per line, a blank line between items."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
):
    """Score any system's outputs with the official metrics."""
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
    steps: int = typer.Option(400, help="Training steps (fixed: the result does not depend on the machine's speed)."),
    time_budget: Optional[float] = typer.Option(None, help="Opt-in: stop training after this many minutes (the "
                                                "result then depends on the machine's speed)."),
    train_size: int = typer.Option(200, help="Training pairs sampled from E2E."),
    eval_size: int = typer.Option(60, help="Evaluation MRs (never trained on)."),
    num_beams: int = typer.Option(1, help="Beam width for both systems (1 = greedy)."),
):
    """Prefix-tune SmolLM2-135M on 200 E2E pairs and compare with zero-shot prompting."""
    from .demo import run_demo

    if data_dir is None and Path("../shared/data/e2e").exists():
        data_dir = "../shared/data"
    run_demo(out=out, data_dir=data_dir, steps=steps, minutes=time_budget, train_size=train_size, eval_size=eval_size,
             num_beams=num_beams)


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="Base model served (short name, folder or Hub id)."),
    store: str = typer.Option("prefixes.db", help=STORE_HELP + " Created if missing."),
    files_dir: Optional[Path] = typer.Option(None, help=FILES_DIR_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch_size: int = typer.Option(32, help="Most requests decoded together (any mix of prefixes)."),
    batch_window_ms: float = typer.Option(10.0, help="Wait this long for more requests when idle."),
    max_queue: int = typer.Option(64, help="Waiting requests beyond this get 429 + Retry-After."),
    request_timeout: float = typer.Option(120.0, help="Seconds before a request gets 504."),
    prefix_cache_size: int = typer.Option(64, help="Loaded prefixes kept in memory (LRU)."),
    threads: Optional[int] = typer.Option(None, help="torch threads for the model worker (default: all cores)."),
    max_batch_tokens: int = typer.Option(16384, help="Work/KV budget in token slots (docs/serving.md#guarantees)."),
    max_prompt_tokens: int = typer.Option(4096, help="Longest prompt in tokens; longer gets 400."),
    store_poll: float = typer.Option(5.0, help="Re-check cached prefixes against the store every this many seconds."),
    store_sweep: float = typer.Option(300.0, help="Sweep files left by interrupted uploads every this many seconds."),
):
    """Serve completions for many users' prefixes from one frozen model (OpenAI-style HTTP API)."""
    from .serve import ServeConfig, run_server

    config = ServeConfig(max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         request_timeout_s=request_timeout, prefix_cache_size=prefix_cache_size, torch_threads=threads,
                         max_batch_tokens=max_batch_tokens, max_prompt_tokens=max_prompt_tokens,
                         store_poll_s=store_poll, store_sweep_s=store_sweep)
    run_server(model, store, host=host, port=port, config=config, files_dir=files_dir)



def _store(location: str, model_name: Optional[str] = None, files_dir: Optional[Path] = None):
    from .serve import PrefixStore

    model = None
    if model_name:
        from .models import load_model

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
    from .prefix import PrefixFileError
    from .serve.store import StoreError

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
    from .serve.store import StoreError

    try:
        record = _store(store).remove(name, owner)
    except StoreError as e:
        _fail(str(e))
    typer.echo(f"removed {record.name}")


@keys_app.command("add")
def keys_add(owner: str = typer.Argument(...), store: str = typer.Option("prefixes.db", help=STORE_HELP)):
    """Create an API key for OWNER; the key is the last word printed (only its hash is stored)."""
    from .serve.store import check_owner

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
    from .serve.store import StoreError

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
    from .serve.store import StoreError
    from .serve.store_sql import copy_store

    try:
        source, target = _store(src, files_dir=src_files_dir), _store(dst, files_dir=dst_files_dir)
        prefixes, keys = copy_store(source, target)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"copied {prefixes} prefixes and {keys} API keys from {source.backend.location} to "
               f"{target.backend.location} (files in {target.files_dir})")


def user_error_message(e: BaseException) -> str | None:
    """One line for a user's mistake (bad name, path, data, settings, file); None for a bug."""
    from .config import ConfigError
    from .data import DataError, MissingDataError
    from .data.fetch import DownloadError
    from .prefix import PrefixFileError
    from .serve.store import StoreError
    from .train import TrainingError

    if isinstance(e, StoreError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte {e.start}); save it as UTF-8"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    if isinstance(e, (ConfigError, DataError, MissingDataError, DownloadError, PrefixFileError, TrainingError,
                      ValueError, FileNotFoundError)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def main() -> None:
    """Entry point, the CLI's one error boundary: a user's mistake prints one `error: ...` line and
    exits 2; only a bug shows a traceback."""
    from .progress import on_terminal

    if not on_terminal():  # logs and CI: no progress-bar noise from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        app()  # click's standalone mode handles usage errors and exits itself
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(e)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)



# ---------------------------------------------------------------------------------------------
# Experiments (the paper's sweeps) and loss plots. Kept as one block; `main` above is unchanged.

@app.command()
def experiment(
    name: str = typer.Argument(..., help="low-data, extrapolation, prefix-length, embedding-only, infix, init, ptuning-v2"),
    out: Path = typer.Option(..., help="Experiment folder: runs/, results.jsonl, table.md, figure."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the experiment's, e.g. smollm2-135m)."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder (default: $PREFIXTUNE_DATA or the cache)."),
    dataset: Optional[str] = typer.Option(None, help="Override the experiment's dataset (e.g. jsonl with --path)."),
    path: Optional[str] = typer.Option(None, help="File for the jsonl dataset."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods instead of the experiment's "
                                          "(ptuning-v2: its arms ptuning-v2, prompt, finetune, probe)."),
    scale: str = typer.Option("quick", help="quick (one seed, size 50, 80-step runs: 18-50 min per experiment on 2 CPU cores without native bf16, measured; see docs/results.md), paper, or tiny (tests)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds instead of the scale's (e.g. 0)."),
    sizes: Optional[str] = typer.Option(None, help="Comma-separated training sizes instead of the scale's "
                                        "(low-data, init)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray instance)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and exit."),
):
    """Run one of the paper's experiments as a resumable sweep of Ray tasks; writes rows, table, figure."""
    from .paper import build, run_experiment
    from .train import TrainingError

    from .paper import ExperimentError

    def int_list(option: str, text: Optional[str]):
        if text is None:
            return None
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ExperimentError(f"--{option} takes comma-separated integers, got {text!r}") from None

    exp = build(name, scale, model=model, dataset=dataset, data_dir=data_dir, path=path,
                methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                seeds=int_list("seeds", seeds), sizes=int_list("sizes", sizes))
    if dry_run:
        for n in exp.notes:
            typer.echo(n)
        for r in exp.runs:
            typer.echo(f"{r.id}: {r.method} {r.overrides}")
        return
    with _runs_progress(f"{name} runs") as bar:
        try:
            result = run_experiment(exp, out, ray_address=ray_address, print_fn=progress_print, progress=bar)
        except RuntimeError as e:
            raise TrainingError(str(e)) from None
    typer.echo(result["table"])
    typer.echo(f"wrote {out / 'results.jsonl'}, {result['table_path']}"
               + (f", {result['figure_path']}" if result["figure_path"] else ""))


def _runs_progress(label: str):
    """A bar over the sweep's runs on a terminal (None otherwise); log lines print above it."""
    import contextlib

    from . import progress as progress_mod

    @contextlib.contextmanager
    def bar_cm():
        if not progress_mod.on_terminal():
            yield None
            return
        from tqdm import tqdm

        bar = tqdm(total=None, unit="run", desc=label, dynamic_ncols=True, file=sys.stderr)
        progress_mod._BAR = bar

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            yield update
        finally:
            progress_mod._BAR = None
            bar.close()

    return bar_cm()


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A training run's --out folder (reads its log.jsonl)."),
         out: Optional[Path] = typer.Option(None, help="PNG file (default: RUN_DIR/loss.png)."),
         smooth: int = typer.Option(10, help="Moving-average window of the train curve, in steps.")):
    """Draw the train and dev loss curves of a run."""
    from .plots import plot_run

    typer.echo(f"wrote {plot_run(run_dir, out, smooth=smooth)}")


if __name__ == "__main__":
    main()
