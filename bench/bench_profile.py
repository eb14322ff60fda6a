"""Where a training step's time goes, by operator: a prefix step against the floor (issue 20).

    python bench/bench_profile.py [--quick] [--reps 3] [--json out.json]

One batch of 10 E2E pairs, SmolLM2-135M (the tiny model with --quick), in the precision chosen for the
run. Two steps are profiled with torch.profiler (after a warm-up), each the best of `reps`:

  prefix   prefixtune's training step: prefix length 10 + MLP 512, target-position loss, backward, AdamW
  floor    the frozen LM alone on the same batch (forward, LM head at targets, backward to the activations)

It prints each step's self CPU time grouped by operator (the largest first), the share of the matmuls
(aten::mm/addmm/bmm/linear and their backward kernels), and the operators whose time the prefix step
adds over the floor: what a faster step would have to remove.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import common
from common import pt

from prefixtune.batching import collate
from prefixtune.engine import target_loss
from prefixtune.methods import trainable_state

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn_linear",
              "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def by_operator(prof) -> dict[str, float]:
    """Self CPU seconds per operator name."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        out[e.key] = out.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    return out


def main() -> None:
    import bench_train as bt

    ap = common.parser(__doc__)
    ap.add_argument("--top", type=int, default=12, help="operators listed per step")
    args = ap.parse_args()
    env = common.setup(args)
    reps = 1 if args.quick else args.reps
    model, tok = common.load(args.quick)
    b = collate(bt.encoded_pairs(tok, common.e2e_pairs(10)), tok.pad_token_id, False)
    pm = pt.PrefixModel(model, bt.prefix_config(None))
    params = list(trainable_state(pm).values())
    optimizer = torch.optim.AdamW(params, lr=bt.LR)

    def prefix_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=env.bf16):
            loss = target_loss(pm.model, pm.rows(), b.input_ids, b.attention_mask, b.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"prefix": prefix_step, "floor": lambda: bt.floor_step(model, b, env.bf16)}
    for fn in steps.values():
        fn()  # warm-up
    load_start = common.machine()["load_average"]
    best: dict[str, tuple[float, dict]] = {}
    for r in range(reps):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof, common.Stopwatch() as sw:
                steps[name]()
            if name not in best or sw.seconds < best[name][0]:
                best[name] = (sw.seconds, by_operator(prof))
    load_end = common.machine()["load_average"]

    result = {}
    print(f"profile of one step, batch 10, {env.precision}, {env.threads} threads, best of {reps}; "
          f"load average {load_start} -> {load_end}")
    for name, (seconds, ops) in best.items():
        total = sum(ops.values())
        matmul = sum(v for k, v in ops.items() if k in MATMUL_OPS or k.startswith(("aten::mm", "aten::addmm")))
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]
        result[name] = {"seconds": round(seconds, 4), "profiled_self_seconds": round(total, 4),
                        "matmul_share": round(matmul / total, 3), "top": [[k, round(v, 4)] for k, v in top]}
        print(f"  {name}: {seconds:.3f} s wall, matmul + attention-kernel share {matmul / total:.1%} of {total:.3f} s self CPU")
        for k, v in top:
            print(f"    {k:<58} {v:8.4f} s  {v / total:6.1%}")
    floor_ops, prefix_ops = best["floor"][1], best["prefix"][1]
    extra = sorted(((k, v - floor_ops.get(k, 0.0)) for k, v in prefix_ops.items()), key=lambda kv: -kv[1])[:args.top]
    added = best["prefix"][0] - best["floor"][0]
    print(f"  the prefix step adds {added:.3f} s over the floor; the operators that add most:")
    for k, v in extra:
        print(f"    {k:<58} {v:+8.4f} s")
    result["added_over_floor"] = {"seconds": round(added, 4), "top": [[k, round(v, 4)] for k, v in extra]}
    ratios = [common.ratio("profile: matmul + attention-kernel share of a prefix step's self CPU time", result["prefix"]["matmul_share"], None,
                           f"floor {result['floor']['matmul_share']:.3f}"),
              common.ratio("profile: prefix step / floor step (profiled)", best["prefix"][0] / best["floor"][0], None,
                           f"top added: {extra[0][0]} {extra[0][1]:+.3f} s")]
    common.write(args, {"part": "profile", "precision": env.reason, "reps": reps,
                        "load_average_start_end": [load_start, load_end], "steps": result, "ratios": ratios})


if __name__ == "__main__":
    main()
