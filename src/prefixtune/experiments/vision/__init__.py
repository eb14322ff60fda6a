"""The image experiments, one file each: `probe.py` (linear probes of a frozen encoder), `vpt.py` (probe vs
VPT-shallow vs VPT-deep vs full fine-tuning vs LoRA) and `l2p.py` (split CIFAR-10, class-incremental);
`common.py` holds what they share. This file is their registry and `prefixtune experiment probe|vpt|l2p`.

    prefixtune experiment probe --out runs/exp-probe      # logistic regression on frozen CLS / mean-patch features
    prefixtune experiment vpt --out runs/exp-vpt          # probe vs VPT-shallow vs VPT-deep vs full FT vs LoRA
    prefixtune experiment l2p --out runs/exp-l2p          # split CIFAR-10, 5 tasks x 2 classes, class-incremental

Their data path (images, accuracy) differs from the text experiments' (executor.py), the protocol does
not: learning rates chosen per arm on held-out data, seeds, paired intervals (protocol.py, stats.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..catalogue import ExperimentError
from .common import DEFAULT_MODEL
from .l2p import L2P_ARMS, L2P_SCALES, l2p_plan, run_l2p_experiment
from .probe import probe_plan, run_probe_experiment
from .vpt import VISION_SCALES, VPT_ARMS, run_vpt_experiment, vpt_plan


def _run_probe(out, data_dir, model_name, bf16: bool | None = None, print_fn=print, **_) -> dict:
    """run_probe_experiment with its table (probe.md); it has no arms, scales or seeds to choose."""
    result = run_probe_experiment(out, data_dir, model_name, bf16=bool(bf16), print_fn=print_fn)
    return {**result, "table": (Path(out) / "probe.md").read_text()}


@dataclass(frozen=True)
class ImageExperiment:
    run: Callable[..., dict]       # (out, data_dir, model_name, scale=, arms=, seeds=, bf16=, print_fn=) -> {"table": ...}
    plan: Callable[..., list[str]]  # (scale=, arms=, seeds=, bf16=) -> what `run` would run (--dry-run)
    arms: dict | None              # the arms --methods chooses among (None: none to choose)
    scales: dict | None
    writes: tuple[str, ...]        # the files it writes into its folder


IMAGE_EXPERIMENTS = {
    "probe": ImageExperiment(_run_probe, probe_plan, None, None, ("probe.json", "probe.md")),
    "vpt": ImageExperiment(run_vpt_experiment, vpt_plan, VPT_ARMS, VISION_SCALES, ("results.jsonl", "table.md")),
    "l2p": ImageExperiment(run_l2p_experiment, l2p_plan, L2P_ARMS, L2P_SCALES, ("results.jsonl", "table.md")),
}


def run_vision_experiment(name: str, out, model: str | None = None, data_dir: str | None = None,
                          scale: str = "quick", seeds=None, arms=None, bf16: bool | None = None, dry_run: bool = False,
                          print_fn=print) -> dict | None:
    """The image experiment `name` into folder `out`; prints its table. `bf16`: autocast for the frozen
    encoder (None: the scale's); `dry_run` prints what would run instead."""
    if name not in IMAGE_EXPERIMENTS:
        raise ExperimentError(f"{name!r} is not an image experiment ({', '.join(IMAGE_EXPERIMENTS)})")
    spec = IMAGE_EXPERIMENTS[name]
    unknown = sorted(set(arms or ()) - set(spec.arms or ()))
    if unknown and spec.arms is not None:
        raise ExperimentError(f"experiment {name} has arms {', '.join(spec.arms)}; not {', '.join(unknown)}")
    if spec.scales is not None and scale not in spec.scales:
        raise ExperimentError(f"experiment {name} has scales {', '.join(spec.scales)}, not {scale!r}")
    options = dict(scale=scale, arms=list(arms) if arms else None, seeds=list(seeds) if seeds else None, bf16=bf16)
    if dry_run:
        for line in spec.plan(**options):
            print_fn(line)
        return None
    result = spec.run(out, data_dir, model or DEFAULT_MODEL, print_fn=print_fn, **options)
    print_fn(result["table"])
    print_fn("wrote " + ", ".join(str(Path(out) / f) for f in spec.writes))
    return result
