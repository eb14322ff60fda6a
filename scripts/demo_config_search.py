"""The search behind `make demo`'s training budget (issue 20: the demo must fit 10 minutes on every CPU).

    python scripts/demo_config_search.py --data-dir ../shared/data --out runs/demo-search \\
        '{"lr": 0.002, "batch": 5, "max_steps": 120}' '{"lr": 0.001, "batch": 10, "max_steps": 200, "seed": 1}'

Each JSON argument is one configuration (keys: lr, batch, max_steps; optional warmup 5, eval_every 20,
dev_examples 30, seed 0). Everything else is the demo's: SmolLM2-135M-Instruct, 200 E2E dev pairs
sampled by MR with the seed, a prefix of length 10 with an MLP of 512 initialised from the demo's text,
the best dev-loss state kept, then greedy BLEU on the 60 held-out evaluation MRs. One JSON line per
configuration is printed and appended to OUT/search.jsonl. The rows of 2026-12-06 are in
results/demo/config-search-2026-12-06.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefixtune import models
from prefixtune.config import PrefixConfig
from prefixtune.data_plan import DataPlan
from prefixtune.decode import DecodeConfig
from prefixtune.demo import DEMO_PREFIX
from prefixtune.experiments.run import evaluate, run_training
from prefixtune.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="JSON objects: lr, batch, max_steps [, warmup, eval_every, dev_examples, seed]")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="runs/demo-search")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    configs = [json.loads(c) for c in args.configs]  # all parsed before the model loads
    torch.set_num_threads(args.threads)
    model, tok = models.load_model("smollm2-135m")
    for c in configs:
        seed = c.get("seed", 0)
        plan = DataPlan("e2e", data_dir=args.data_dir, train_split="dev", eval_split="dev", train_size=200, seed=seed,
                        eval_size=60)
        train_cfg = TrainConfig(lr=c["lr"], epochs=50, batch_size=c["batch"], warmup_steps=c.get("warmup", 5),
                                max_steps=c["max_steps"], eval_every=c.get("eval_every", 20), patience=3,
                                dev_max_examples=c.get("dev_examples", 30), seed=seed, log_every=10)
        out = Path(args.out) / "-".join(f"{k}{v}" for k, v in sorted(c.items()))
        started = time.time()
        run = run_training("smollm2-135m", plan, PrefixConfig(**DEMO_PREFIX), train_cfg, out, print_fn=lambda *a: None,
                           model_and_tokenizer=(model, tok))
        trained = time.time()
        result = evaluate(model, tok, run["artifact"], run["eval_items"], "e2e",
                          DecodeConfig(num_beams=1, max_new_tokens=60, batch_size=20), out / "eval")
        row = dict(c, seed=seed, best_step=run.get("best_step"), bleu=round(result["scores"]["bleu"], 4),
                   train_s=round(trained - started, 1), eval_s=round(time.time() - trained, 1), torch_threads=args.threads)
        print(json.dumps(row), flush=True)
        with open(Path(args.out) / "search.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
