"""The executor: many independent training+evaluation runs (RunSpecs) fanned out as Ray tasks, resumable.

Layout of an experiment folder OUT:
  OUT/runs/<run id>/          one run: run.json, log.jsonl, checkpoint, artifact, eval/metrics.json, row.json
  OUT/results.jsonl           one row per completed run (rewritten atomically as runs finish)
  OUT/table.md, OUT/*.png     aggregates over seeds, drawn by report.py

A run whose row.json exists is done and is skipped on a rerun; a run killed half-way has a
checkpoint.safetensors and resumes from it (the trainer resumes exactly). Runs never share state,
so the driver is the only writer of results.jsonl.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import prefixtune

from ..data_plan import DataPlan
from ..decode_config import decode_config_for
from ..files import atomic_write_bytes
from ..recipes import configs_for, recipe_for


@dataclass
class RunSpec:
    """One training+evaluation run. `labels` are what the tables and plots group by (method label,
    training size, prefix length, ...); `overrides` go to recipes.configs_for."""

    id: str
    method: str
    dataset: str
    plan: dict                                   # DataPlan fields
    overrides: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)   # DecodeConfig overrides
    labels: dict = field(default_factory=dict)
    eval_limit: int | None = None                # evaluate at most this many sources (balanced seen/unseen)
    # False: train and measure the dev loss only (a learning-rate selection run; its row is select.json)
    evaluate: bool = True
    # runs that differ only by seed (and learning rate) share a group: one learning rate is chosen per group
    group: str | None = None


# The untrained model with the same input format: no method, no training, the same evaluation.
ZERO_STEP = "zero-step"


def package_versions() -> dict:
    # torch: only when a row is recorded; planning, --dry-run and reading results need no torch (start-up time)
    import torch
    # transformers: only when a row is recorded (importing it takes seconds)
    import transformers

    return {"prefixtune": getattr(prefixtune, "__version__", "?"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def machine() -> dict:
    """Where a row was measured: CPU model and count, GPU if any (speed figures are only comparable
    on the same machine; results are not speed-dependent)."""
    # torch: only when a row is recorded; planning, --dry-run and reading results need no torch (start-up time)
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": local_cpus(), "gpu": gpu, "host": platform.node()}


def dev_curve(run_dir: Path) -> list[list[float]]:
    """[[step, dev loss], ...] from a run's log.jsonl (the last record of a step wins: resumed runs)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    points = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("dev_loss") is not None:
            points[rec["step"]] = rec["dev_loss"]
    return [[k, points[k]] for k in sorted(points)]


def run_one(spec: RunSpec, model_name: str, root: str | Path, threads: int | None = None,
            print_fn: Callable[[str], None] | None = None) -> dict:
    """Train and evaluate one run in root/runs/<id>; returns its row (cached in row.json, or select.json
    for a train-only selection run). A selection run and the comparison run of the same id share the
    folder: the comparison resumes the finished training and only adds the evaluation."""
    # torch: only when a run runs; planning, --dry-run and reading results need no torch (start-up time)
    import torch

    from ..train import TrainingError  # torch: only when a run runs (start-up time)
    # torch: only when a run runs (start-up time); looked up at call time: tests patch run.run_training
    from .run import evaluate, plan_data, run_training

    run_dir = Path(root) / "runs" / spec.id
    row_path = run_dir / ("row.json" if spec.evaluate else "select.json")
    if row_path.exists():
        return json.loads(row_path.read_text())
    if threads:
        torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.log", "a", encoding="utf-8")

    def say(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if print_fn is not None:
            print_fn(f"[{spec.id}] {line}")

    started = time.time()
    plan = DataPlan(**spec.plan)
    resume = False
    try:
        if spec.method == ZERO_STEP:
            from ..models import load_model  # torch: only when a run runs (start-up time)

            _, _, eval_items = plan_data(plan, spec.eval_limit)
            model, tok = load_model(model_name)
            result = {"model": model, "tokenizer": tok, "eval_items": eval_items, "artifact": None,
                      "trainable_params": 0, "steps": 0, "best_dev_loss": None, "best_step": None,
                      "stopped_early": None, "total_steps": 0, "train_seconds": 0.0}
            train_cfg = None
        else:
            method_cfg, train_cfg = configs_for(spec.dataset, spec.method, **spec.overrides)
            resume = (run_dir / "checkpoint.safetensors").exists()
            if resume:
                say("resuming from its checkpoint")
            try:
                result = run_training(model_name, plan, method_cfg, train_cfg, run_dir, resume=resume, print_fn=say,
                                      score_limit=spec.eval_limit)
            except TrainingError as e:
                if spec.evaluate or "became" not in str(e):
                    raise
                # a selection run that diverged is a result (this rate is too high), not a failure
                say(f"diverged: {e}")
                result = {"trainable_params": None, "steps": None, "best_dev_loss": None, "train_seconds": 0.0,
                          "diverged": str(e)}
        metrics = None
        if spec.evaluate:
            items = result["eval_items"]  # the scored ones: their sources gave no dev loss
            decode_cfg = decode_config_for(spec.dataset, **spec.decode)
            metrics = evaluate(result["model"], result["tokenizer"], result["artifact"], items,
                               recipe_for(spec.dataset).metric, decode_cfg, run_dir / "eval")
    finally:
        log.close()
    row = {"id": spec.id, "method": spec.method, **spec.labels, "group": spec.group, "dataset": spec.dataset,
           "model": model_name, "train_size": plan.train_size, "seed": plan.seed, "overrides": spec.overrides,
           "lr": train_cfg.lr if train_cfg else None, "bf16": train_cfg.bf16 if train_cfg else None,
           "trainable_params": result["trainable_params"], "steps": result["steps"],
           "total_steps": result.get("total_steps"), "best_step": result.get("best_step"),
           "stopped_early": result.get("stopped_early"), "best_dev_loss": result["best_dev_loss"],
           "dev_curve": dev_curve(run_dir), **({"diverged": result["diverged"]} if "diverged" in result else {}),
           "train_seconds": round(result["train_seconds"], 1), "wall_seconds": round(time.time() - started, 1),
           "resumed": resume, "versions": package_versions(), "machine": machine()}
    if metrics is not None:
        row.update({"n_eval": metrics["n"], "scores": metrics["scores"],
                    **{k: metrics[k] for k in ("scores_seen", "scores_unseen") if k in metrics},
                    "decode_seconds": metrics.get("decode_seconds")})
    atomic_write_bytes(row_path, json.dumps(row, indent=2, default=str).encode())
    return row


RESULTS = "results.jsonl"              # comparison runs (evaluated)
SELECTION = "lr_selection.jsonl"      # learning-rate selection runs (dev loss only)


def read_results(out: str | Path, name: str = RESULTS) -> list[dict]:
    path = Path(out) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(out: str | Path, rows: list[dict], name: str = RESULTS) -> None:
    data = "".join(json.dumps(r, default=str) + "\n" for r in rows)
    atomic_write_bytes(Path(out) / name, data.encode())


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_sweep(specs: list[RunSpec], model_name: str, out: str | Path, ray_address: str | None = None,
              cpus_per_run: int | None = None, print_fn: Callable[[str], None] = print,
              progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Run every spec not yet done as a Ray task; returns all rows (earlier ones included), in spec order,
    then rows on record from earlier commands with other specs (other seeds, sizes or methods: kept).

    Local (no address): a private Ray instance with this machine's cores, and each run asks for all
    of them (one run at a time: on a small CPU box two runs would only fight over cores).
    With an address: that cluster's scheduler places runs; each asks for `cpus_per_run` (default 1)
    and a GPU when the cluster has GPUs.
    """
    # ray: only when a sweep runs; the catalogue, report and --dry-run import this module (start-up time)
    import ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("run ids in an experiment must be unique")
    if len({s.evaluate for s in specs}) > 1:
        raise ValueError("a sweep is either selection runs or evaluated runs, not both")
    record = RESULTS if not specs or specs[0].evaluate else SELECTION
    done = {r["id"]: r for r in read_results(out, record)}
    for s in specs:  # a row written by a run whose driver died before recording it
        row_path = out / "runs" / s.id / ("row.json" if s.evaluate else "select.json")
        if s.id not in done and row_path.exists():
            done[s.id] = json.loads(row_path.read_text())
    for s in specs:  # a finished run under this id with other settings: never mixed into the table silently
        recorded = done.get(s.id, {}).get("overrides")
        if recorded is not None and recorded != json.loads(json.dumps(s.overrides, default=str)):
            raise ValueError(f"run {s.id} in {out} finished with other settings ({recorded}) than this command "
                             f"asks for ({s.overrides}); use another --out, or delete {out / 'runs' / s.id} and "
                             f"its line in results.jsonl to rerun it")
    todo = [s for s in specs if s.id not in done]

    asked = set(ids)

    def on_record() -> list[dict]:  # this command's runs in spec order, then every earlier row kept
        return [done[i] for i in ids if i in done] + [r for i, r in done.items() if i not in asked]

    print_fn(f"{len(specs)} runs: {len(specs) - len(todo)} already done, {len(todo)} to run")
    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            if ray_address:
                _check_reachable(ray_address)
                try:
                    ray.init(address=ray_address, log_to_driver=False)
                except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, ...
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise RuntimeError(f"cannot connect to the Ray cluster at {ray_address} ({last}); is `ray start "
                                       "--head` running there? A cluster with token authentication needs "
                                       "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
            else:
                # address="local": a private instance even when `ray start` runs on this machine
                ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False)
        try:
            cluster = ray.cluster_resources()
            cpus = cpus_per_run or (max(1, int(cluster.get("CPU", 1))) if not ray_address else 1)
            gpus = 1 if cluster.get("GPU", 0) >= 1 else 0
            task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_one)
            print_fn(f"ray: {int(cluster.get('CPU', 0))} CPUs, {int(cluster.get('GPU', 0))} GPUs; "
                     f"{cpus} CPU(s){' + 1 GPU' if gpus else ''} per run")
            pending = {task.remote(s, model_name, str(out), cpus): s for s in todo}
            t0, finished = time.time(), 0
            if progress is not None:
                progress(0, len(todo))
            failures = []
            while pending:
                # a short timeout keeps Ctrl-C working (a blocking wait does not return to Python);
                # then ray.shutdown below stops the workers, and their checkpoints resume next time
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                spec = pending.pop(ready[0])
                finished += 1
                if progress is not None:
                    progress(finished, len(todo))
                try:
                    row = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    failures.append((spec.id, e))
                    print_fn(f"[{finished}/{len(todo)}] {spec.id} FAILED: {str(e).splitlines()[-1] if str(e) else e}")
                    continue
                done[spec.id] = row
                write_results(out, on_record(), record)
                elapsed = time.time() - t0
                eta = elapsed / finished * (len(todo) - finished)
                print_fn(f"[{finished}/{len(todo)}] {spec.id}: {_headline(row)} "
                         f"({row['wall_seconds']:.0f} s; sweep ETA {eta / 60:.1f} min)")
        finally:
            if started_here:
                ray.shutdown()
        if failures:
            raise RuntimeError(f"{len(failures)} run(s) failed ({', '.join(i for i, _ in failures)}); "
                               f"see {out}/runs/<id>/stdout.log; rerun the command to retry them")
    rows = on_record()
    write_results(out, rows, record)
    return rows


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses and the like: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); is `ray start --head` "
                           "running there, and is the port right?") from None


def _headline(row: dict) -> str:
    """A finished run in a few words: its first three scores, or (a selection run, not evaluated) its best dev loss."""
    scores = row.get("scores", {})
    words = ", ".join(f"{k} {v:.4g}" for k, v in list(scores.items())[:3] if isinstance(v, (int, float)))
    loss = row.get("best_dev_loss")
    if not words and isinstance(loss, (int, float)):
        words = f"best dev loss {loss:.4f} at step {row.get('best_step')}"
    return words
