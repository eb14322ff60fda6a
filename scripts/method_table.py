"""Train every generation method on the same small E2E budget and print docs/methods.md's result table.

    .venv/bin/python scripts/method_table.py --data-dir ../shared/data --out runs/methods [--steps 100]

Same data for every method: 200 E2E pairs sampled by MR from the dev split, the dev loss on 30
held-out MRs, greedy decoding of 40 further MRs never trained on, official E2E metrics. Each
method uses its recipe learning rate (prefixtune.recipes) and the same number of steps. Runs are
resumable: a finished method is read back from its folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefixtune.decode import DecodeConfig
from prefixtune.experiments import DataPlan, evaluate, run_training
from prefixtune.methods import METHODS
from prefixtune.models import load_model
from prefixtune.recipes import configs_for

SETTINGS = {  # per-method sizes for this table (the rest comes from the recipe)
    "prefix": dict(length=10, init_text="table-to-text: restaurant description", lr=1e-3),
    "infix": dict(length=10, init_text="table-to-text: restaurant description", lr=1e-3),
    "prompt": dict(length=10, init_text="table-to-text: restaurant description"),
    "ptuning": dict(template="[P]*5 {source} [P]*5"),
    "finetune": dict(),
    "ft-top": dict(),
    "adapter": dict(),
    "lora": dict(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", default=",".join(SETTINGS))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    n_model = sum(p.numel() for p in model.parameters())
    rows = []
    for name in args.methods.split(","):
        if name not in METHODS:
            print(f"skip {name}: not registered")
            continue
        out = Path(args.out) / name
        done = out / "result.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        model, tok = load_model(args.model)  # fresh weights: weight methods change them
        method_cfg, train_cfg = configs_for("e2e", name, epochs=100, max_steps=args.steps, batch_size=10,
                                            warmup_steps=10, eval_every=25, checkpoint_every=25,
                                            dev_max_examples=60, log_every=25, **SETTINGS[name])
        plan = DataPlan("e2e", data_dir=args.data_dir, train_split="dev", eval_split="dev", train_size=200, seed=0,
                        eval_size=40)
        torch.manual_seed(0)
        started = time.time()
        run = run_training(args.model, plan, method_cfg, train_cfg, out, resume=(out / "checkpoint.safetensors").exists(),
                           model_and_tokenizer=(model, tok))
        train_s = time.time() - started
        res = evaluate(run["model"], tok, run["artifact"], run["eval_items"], "e2e",
                       DecodeConfig(num_beams=1, max_new_tokens=60, batch_size=20), out / "eval")
        row = {"method": name, "trainable": run["trainable_params"], "percent": 100 * run["trainable_params"] / n_model,
               "file_bytes": Path(run["artifact_path"]).stat().st_size, "steps": run["steps"],
               "best_dev_loss": run["best_dev_loss"], "train_seconds": round(train_s), **res["scores"]}
        done.write_text(json.dumps(row, indent=2))
        rows.append(row)
    print(f"\n{'method':<10} {'trainable':>12} {'%':>8} {'file':>10} {'dev loss':>9} {'BLEU':>7} {'NIST':>7} "
          f"{'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>7}")
    for r in rows:
        print(f"{r['method']:<10} {r['trainable']:>12,} {r['percent']:>7.3f}% {r['file_bytes'] / 1024:>8.0f}KiB "
              f"{r['best_dev_loss']:>9.3f} {r['bleu']:>7.4f} {r['nist']:>7.3f} {r['meteor']:>7.4f} {r['rouge_l']:>8.4f} "
              f"{r['cider']:>7.3f}")


if __name__ == "__main__":
    main()
