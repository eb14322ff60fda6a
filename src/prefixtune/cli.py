"""The `prefixtune` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

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


@app.command()
def train(
    model: str = typer.Option("smollm2-135m", help="Short name, local folder or Hub id of the frozen base model."),
    dataset: str = typer.Option(..., help="e2e, webnlg, dart, xsum, or jsonl (with --path)."),
    out: Path = typer.Option(..., help="Output folder: prefix.safetensors, checkpoint.safetensors, log.jsonl."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the data (else $PREFIXTUNE_DATA or the cache)."),
    path: Optional[str] = typer.Option(None, help="The JSONL file, for --dataset jsonl."),
    train_split: str = typer.Option("train", help="Split to train on."),
    eval_split: str = typer.Option("dev", help="Split to take dev loss / evaluation sources from."),
    train_size: Optional[int] = typer.Option(None, help="Low-data: sample this many pairs (grouped by source)."),
    method: str = typer.Option("prefix", help="Method (prefix-tuning; recorded in the file)."),
    prefix_length: Optional[int] = typer.Option(None, help="Prefix length (paper default per dataset)."),
    reparam: Optional[str] = typer.Option(None, help="mlp or flat."),
    mlp_hidden: Optional[int] = typer.Option(None, help="Hidden width of the reparametrization MLP."),
    init_text: Optional[str] = typer.Option(None, help="Initialize the prefix from these words' activations."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (paper default per dataset)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (paper default per dataset)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (paper default per dataset)."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    time_budget: Optional[float] = typer.Option(None, help="Stop training after this many seconds."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    eval_every: Optional[int] = typer.Option(None, help="Dev loss every N steps (default: each epoch)."),
    patience: Optional[int] = typer.Option(None, help="Early stopping patience in dev evaluations."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the frozen LM (about 2x faster on recent CPUs/GPUs)."),
    seed: int = typer.Option(0, help="Seed for sampling, data order and initialization."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors."),
):
    """Train a prefix on a frozen LM."""
    from .experiments import DataPlan, paper_configs, run_training

    if method != "prefix":
        _fail(f"--method {method!r} is not available yet; methods: prefix")
    prefix_cfg, train_cfg = paper_configs(
        dataset, prefix_length=prefix_length, reparam=reparam, mlp_hidden=mlp_hidden, init_text=init_text,
        method=method, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
        max_steps=max_steps, time_budget_s=time_budget, checkpoint_every=checkpoint_every, eval_every=eval_every,
        patience=patience, seed=seed, bf16=bf16 or None)
    plan = DataPlan(dataset=dataset, data_dir=data_dir, train_split=train_split, eval_split=eval_split,
                    train_size=train_size, seed=seed, path=path)
    result = run_training(model, plan, prefix_cfg, train_cfg, out, resume=resume)
    typer.echo(f"saved {result['prefix_path']} after {result['steps']} steps (best dev loss {result['best_dev_loss']:.4f})")


@app.command()
def generate(
    prefix: Optional[Path] = typer.Option(None, help="Prefix file (none: the bare model)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the prefix file names)."),
    input: list[str] = typer.Option([], "--input", help="Source text; repeat for several."),
    input_file: Optional[Path] = typer.Option(None, help="File with one source per line."),
    num_beams: int = typer.Option(5, help="Beam width (1 = greedy)."),
    max_new_tokens: int = typer.Option(60, help="Most new tokens per output."),
    do_sample: bool = typer.Option(False, help="Sample instead of beam search."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
):
    """Generate outputs for sources with a trained prefix."""
    from .decode import DecodeConfig, generate_texts
    from .experiments import load_run_prefix
    from .models import load_model

    sources = list(input)
    if input_file:
        sources += [line.rstrip("\n") for line in input_file.read_text().splitlines() if line.strip()]
    if not sources:
        _fail("give --input TEXT or --input-file FILE")
    if prefix is not None:
        loaded, base, tok = load_run_prefix(prefix, model)
    else:
        if not model:
            _fail("give --prefix or --model")
        (base, tok), loaded = load_model(model), None
    cfg = DecodeConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_p=top_p)
    for text in generate_texts(base, tok, sources, loaded, cfg):
        typer.echo(text)


@app.command()
def evaluate(
    prefix: Path = typer.Option(..., help="Prefix file to evaluate."),
    dataset: str = typer.Option(..., help="e2e, webnlg, dart, xsum, or jsonl."),
    out: Path = typer.Option(..., help="Folder for metrics.json and predictions.jsonl."),
    split: str = typer.Option("dev", help="Split to evaluate on."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the data."),
    path: Optional[str] = typer.Option(None, help="The JSONL file, for --dataset jsonl."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one the prefix file names)."),
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
    from .experiments import METRIC_TASK, DataPlan, evaluate as run_eval, load_run_prefix, plan_data
    from .metrics import format_table

    run_json = prefix.parent / "run.json"
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
    loaded, base, tok = load_run_prefix(prefix, model)
    cfg = decode_config_for(dataset, num_beams=num_beams, max_new_tokens=max_new_tokens)
    result = run_eval(base, tok, loaded, items, METRIC_TASK.get(dataset, "generic"), cfg, out, model_based=model_based)
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
    minutes: float = typer.Option(8.0, help="Training time budget in minutes."),
    train_size: int = typer.Option(200, help="Training pairs sampled from E2E."),
    eval_size: int = typer.Option(60, help="Evaluation MRs (never trained on)."),
    num_beams: int = typer.Option(1, help="Beam width for both systems (1 = greedy)."),
):
    """Prefix-tune SmolLM2-135M on 200 E2E pairs and compare with zero-shot prompting."""
    from .demo import run_demo

    if data_dir is None and Path("../shared/data/e2e").exists():
        data_dir = "../shared/data"
    run_demo(out=out, data_dir=data_dir, minutes=minutes, train_size=train_size, eval_size=eval_size,
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
    store_poll: float = typer.Option(5.0, help="Re-check cached prefixes against the store every this many seconds."),
    store_sweep: float = typer.Option(300.0, help="Sweep files left by interrupted uploads every this many seconds."),
):
    """Serve completions for many users' prefixes from one frozen model (OpenAI-style HTTP API)."""
    from .serve import ServeConfig, run_server

    config = ServeConfig(max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         request_timeout_s=request_timeout, prefix_cache_size=prefix_cache_size, torch_threads=threads,
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


def main() -> None:
    """Entry point: user-facing errors print one clear line (exit 2) instead of a traceback."""
    from .config import ConfigError
    from .data import DataError, MissingDataError
    from .data.fetch import DownloadError
    from .prefix import PrefixFileError
    from .serve.store import StoreError
    from .train import TrainingError

    try:
        app()  # click's standalone mode handles usage errors and exits itself
    except KeyboardInterrupt:
        sys.exit(130)
    except (ConfigError, DataError, MissingDataError, DownloadError, PrefixFileError, StoreError, TrainingError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
