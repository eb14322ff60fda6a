"""Experiments: from one training run to the docs' tables.

    run.py        one run: its data plan, training, evaluation, and the checks that make a resumed run the same run
    scales.py     how big an experiment is (sizes, seeds, step budget): paper, quick, tiny
    catalogue.py  one declarative spec per text experiment and the one builder of its runs
    protocol.py   the fair-comparison protocol: learning rate chosen per method on dev loss, zero-step rows
    executor.py   runs fanned out as Ray tasks, resumable; results.jsonl
    stats.py      mean ± std over seeds, paired bootstrap intervals
    tables.py     an experiment's markdown tables
    figures.py    an experiment's figures
    report.py     an experiment folder's table and figures, and the docs' generated blocks, from results/
    command.py    the `prefixtune experiment` command as a library call
    vision/       the image experiments, one file each (probe.py, vpt.py, l2p.py)

The names below are the package's API, each loaded from its module on first use (PEP 562), so that
importing one module (the report, the catalogue) does not import torch.
"""

import importlib

_FROM = {  # module (relative to this package) -> its names
    ".data_plan": ["DataPlan"],  # prefixtune.data_plan: torch-free, the CLI's data options
    "run": ["plan_data", "run_training", "evaluate", "load_run_artifact"],
    "catalogue": ["CATALOGUE", "EXPERIMENTS", "Experiment", "ExperimentError", "ExperimentSpec", "build", "build_runs"],
    "scales": ["SCALES", "Scale"],
    "protocol": ["Protocol"],
    "executor": ["RunSpec", "run_one", "run_sweep", "read_results"],
    "command": ["experiment", "run_experiment"],
    "report": ["regenerate", "write_outputs"],
}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODULE_OF))


__all__ = sorted(_MODULE_OF)
