"""`prefixtune experiment` as a library call: build an experiment from the catalogue, run it under the
fair-comparison protocol on the executor, and write its table and figures (the image experiments are
handed to vision/). cli.py only parses the command line and calls `experiment`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from ..recipes import recipe_for
from .catalogue import CATALOGUE, VISION_EXPERIMENTS, Experiment, ExperimentError, build
from .executor import run_sweep
from .protocol import Protocol, comparison_specs, select_learning_rates
from .report import save_experiment_meta, write_outputs


def experiment(name: str, out: str | Path, *, model: str | None = None, dataset: str | None = None,
               data_dir: str | None = None, path: str | None = None, methods=None, scale: str = "quick",
               precision: str = "fp32", seeds=None, sizes=None, ray_address: str | None = None,
               cpus_per_run: int | None = None, dry_run: bool = False, print_fn: Callable[[str], None] = print,
               progress_bar: Callable[[str], ContextManager] | None = None) -> dict | None:
    """Run experiment `name` into folder `out` (completed runs are kept and skipped) and print its table.

    `methods`, `seeds`, `sizes` replace the experiment's; `precision` is fp32, bf16 or auto (measured once
    per machine); `dry_run` prints the runs instead. `progress_bar(label)`, if given, is a context manager
    yielding `update(done, total)` (progress.count_progress), open while the runs run."""
    # torch: train imports it; only when runs run (--dry-run and tables need no torch: start-up time)
    from ..train import TrainingError

    out = Path(out)
    if name in VISION_EXPERIMENTS:
        # options the image experiments have no use for are refused, not ignored (a --dry-run that ran)
        given = {"--sizes": sizes, "--ray-address": ray_address, "--cpus-per-run": cpus_per_run, "--dataset": dataset,
                 "--path": path}
        unused = [flag for flag, value in given.items() if value is not None]
        if unused:
            raise ExperimentError(f"experiment {name} runs its arms one by one in this process on CIFAR-10: "
                                  f"{', '.join(unused)} is for the text experiments")
        # torch: the vision experiments import it; only when one runs (start-up time)
        from .vision import run_vision_experiment

        return run_vision_experiment(name, out, model=model, data_dir=data_dir, scale=scale, seeds=seeds,
                                     arms=methods, bf16=_bf16(precision, print_fn), dry_run=dry_run,
                                     print_fn=print_fn)
    # a step of this model timed by an earlier training run on this machine answers for the whole experiment
    model_name = model or (CATALOGUE[name].model if name in CATALOGUE else None)
    exp = build(name, scale, model=model, dataset=dataset, data_dir=data_dir, path=path, methods=methods,
                seeds=seeds, sizes=sizes, bf16=_bf16(precision, print_fn, workload=model_name))
    if cpus_per_run is not None and cpus_per_run < 1:
        raise ExperimentError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    if dry_run:
        for n in exp.notes:
            print_fn(n)
        for r in exp.runs:
            print_fn(f"{r.id}: {r.method} {r.overrides}")
        return None
    with (progress_bar or _no_bar)(f"{name} runs") as bar:
        try:
            result = run_experiment(exp, out, ray_address=ray_address, print_fn=print_fn, progress=bar,
                                    cpus_per_run=cpus_per_run)
        except RuntimeError as e:  # failed runs, an unreachable cluster: said in one line, not a traceback
            raise TrainingError(str(e)) from None
    print_fn(result["table"])
    print_fn(f"wrote {out / 'results.jsonl'}, {result['table_path']}"
             + (f", {result['figure_path']}" if result["figure_path"] else ""))
    return result


@contextlib.contextmanager
def _no_bar(label: str):
    yield None


def _bf16(precision: str, print_fn: Callable[[str], None], workload: str | None = None) -> bool:
    if precision not in ("fp32", "bf16", "auto"):
        raise ExperimentError(f"--precision must be fp32, bf16 or auto, got {precision!r}")
    if precision == "auto":
        # torch: precision imports it; only when bf16 is measured (start-up time)
        from ..precision import resolve

        return resolve("auto", print_fn=print_fn, workload=workload).bf16
    return precision == "bf16"


def run_experiment(exp: Experiment, out: str | Path, ray_address: str | None = None,
                   print_fn: Callable[[str], None] = print, progress=None, protocol: Protocol | None = None,
                   cpus_per_run: int | None = None) -> dict:
    """The experiment under the fair-comparison protocol (protocol.py): learning rates chosen per
    method on dev data, then every seed at the chosen rate, plus the zero-step row."""
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
