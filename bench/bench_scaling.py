"""How a prefixtune training step grows with batch size (5/10/20) and prefix length (5/50/200).

    python bench/bench_scaling.py [--quick] [--reps 3] [--json out.json]

One training step as prefixtune's trainer takes it (prefix MLP -> frozen LM -> loss at target
positions -> backward -> clip -> AdamW), on a fixed batch of E2E pairs (the first N of one fixed
sample, so batch 20 holds batch 10's pairs). The batch-size sweep uses prefix length 10; the
prefix-length sweep uses batch 10. The configurations are interleaved; each timing is the best
(min) and median of `reps` steps after one warm-up step. Ideal: step time linear in batch size,
nearly flat in prefix length (a prefix of P adds P keys to attention, not P tokens to the MLPs).
"""

from __future__ import annotations

import torch

import common
from common import pt

from prefixtune.batching import collate
from prefixtune.engine import target_loss
from prefixtune.methods import trainable_state


def make_step(model, tok, pairs, batch_size: int, prefix_len: int, env):
    import bench_train as bt

    torch.manual_seed(0)
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=prefix_len, reparam="mlp", mlp_hidden=bt.MLP_HIDDEN))
    params = list(trainable_state(pm).values())
    optimizer = torch.optim.AdamW(params, lr=bt.LR)
    b = collate(bt.encoded_pairs(tok, pairs[:batch_size]), tok.pad_token_id, False)

    def step() -> float:
        with common.Stopwatch() as sw:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=env.bf16):
                loss = target_loss(model, pm.rows(), b.input_ids, b.attention_mask, b.labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sw.seconds

    return step, int((b.labels != -100).sum())


def main() -> None:
    ap = common.parser(__doc__)
    args = ap.parse_args()
    env = common.setup(args)
    model, tok = common.load(args.quick)
    pairs = common.e2e_pairs(20)
    reps = 1 if args.quick else args.reps
    configs = {f"batch {b}": (b, 10) for b in (5, 10, 20)}
    configs.update({f"prefix {p}": (10, p) for p in (5, 50, 200)})
    steps, targets = {}, {}
    for name, (b, p) in configs.items():
        steps[name], targets[name] = make_step(model, tok, pairs, b, p, env)
        steps[name]()  # warm-up
    load_start = common.machine()["load_average"]
    times = common.interleave(steps, reps)
    load_end = common.machine()["load_average"]
    results = {name: {"batch": configs[name][0], "prefix_length": configs[name][1], "target_tokens": targets[name],
                      "seconds": common.stats(ts), "target_tok_s": targets[name] / min(ts)}
               for name, ts in times.items()}
    print(f"step time vs batch size and prefix length, {env.precision}, {env.threads} threads, best of {reps}; "
          f"load average {load_start} -> {load_end}")
    for name, r in results.items():
        print(f"  {name:<11} {r['seconds']['min']:7.3f} s/step (median {r['seconds']['median']:.3f})  "
              f"{r['target_tok_s']:7.1f} target tok/s")

    def t(name):
        return results[name]["seconds"]["min"]

    ratios = [
        common.ratio("scaling: step(batch 20) / step(batch 10)", t("batch 20") / t("batch 10"), None, "2.0 = linear"),
        common.ratio("scaling: step(batch 10) / step(batch 5)", t("batch 10") / t("batch 5"), None, "2.0 = linear"),
        common.ratio("scaling: step(prefix 50) / step(prefix 5)", t("prefix 50") / t("prefix 5"), None),
        common.ratio("scaling: step(prefix 200) / step(prefix 5)", t("prefix 200") / t("prefix 5"), None),
    ]
    common.write(args, {"part": "scaling", "precision": env.reason, "reps": reps,
                        "load_average_start_end": [load_start, load_end], "configs": results, "ratios": ratios})


if __name__ == "__main__":
    main()
