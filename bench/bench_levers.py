"""The issue's speed levers, each measured on one prefixtune training step (the notes table in docs/performance.md).

    python bench/bench_levers.py [--quick] [--reps 3] [--json out.json]

One batch of 10 E2E pairs, prefix length 10 + MLP 512, SmolLM2-135M; each variant is one training
step (forward, loss, backward, AdamW), interleaved, best and median of `reps` after a warm-up:

  base             prefixtune's step as the trainer takes it: LM head + cross-entropy at target
                   positions only, 64 targets at a time (engine.LOSS_CHUNK)
  full-logits      LM head and cross-entropy at every position (what PEFT + HF Trainer compute)
  unchunked-ce     LM head + cross-entropy over all target positions at once (the base before 2026-11-28)
  1-thread         the base step with 1 torch thread (the machine's cores: see "threads"; --skip-threads)
  checkpointing    the base step with gradient checkpointing (prefixtune.gradient_checkpointing)
  bf16             the base step under bf16 autocast (one run only when it is > 2x slower)
  compiled         the base step with each decoder layer compiled (`prefixtune.compiling.compiled_layers`,
                   what `train --compile` does: one graph reused by every layer; prefixtune's attention
                   functions run eagerly between the compiled parts); the first step's compile time is
                   reported beside it (--skip-compile: not timed)

Peak RSS of a step (VmHWM reset before it) is recorded for base, full-logits, unchunked-ce and
checkpointing. Padding (packing, length buckets) is measured by bench_train.py (real vs padded
tokens per system).
"""

from __future__ import annotations

import torch

import common
from common import pt

from prefixtune.batching import IGNORE, collate
from prefixtune.compiling import compiled_layers
from prefixtune.engine import forward_with_prefix, target_loss
from prefixtune.methods import trainable_state


def unchunked_target_loss(model, rows, input_ids, attention_mask, labels) -> torch.Tensor:
    """target_loss with the LM head + cross-entropy over every target position in one piece."""
    hidden = forward_with_prefix(model, rows, input_ids=input_ids, attention_mask=attention_mask,
                                 run=model.base_model, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def full_logits_loss(model, rows, input_ids, attention_mask, labels) -> torch.Tensor:
    logits = forward_with_prefix(model, rows, input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE)


def main() -> None:
    import bench_train as bt
    from prefixtune.gradient_checkpointing import enable_gradient_checkpointing

    ap = common.parser(__doc__)
    ap.add_argument("--skip-other-precision", action="store_true",
                    help="do not time a step in the other precision (precision.py measured it already)")
    ap.add_argument("--skip-compile", action="store_true", help="do not time the torch.compile lever")
    ap.add_argument("--skip-threads", action="store_true",
                    help="do not time a 1-thread step (precision.py measures the thread count already)")
    args = ap.parse_args()
    env = common.setup(args)
    reps = 1 if args.quick else args.reps
    model, tok = common.load(args.quick)
    ckpt_model = common.fresh_copy(model)
    pairs = common.e2e_pairs(10)
    b = collate(bt.encoded_pairs(tok, pairs), tok.pad_token_id, False)
    threads = env.threads

    def variant(loss_fn, model=model, n_threads=None, bf16=env.bf16, checkpointing=False, compiled=False):
        torch.manual_seed(0)
        pm = pt.PrefixModel(model, bt.prefix_config(None))
        if checkpointing:
            enable_gradient_checkpointing(pm)
        if compiled:  # regional compilation, as `train --compile`: one graph for 30 identical layers
            compiled_layers(pm).__enter__()  # this process's model copy stays compiled; it exits with it
        params = list(trainable_state(pm).values())
        optimizer = torch.optim.AdamW(params, lr=bt.LR)

        def step() -> dict:
            torch.set_num_threads(n_threads or threads)
            common.peak_rss_reset()
            try:
                with common.Stopwatch() as sw:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = loss_fn(pm.model, pm.rows(), b.input_ids, b.attention_mask, b.labels)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            finally:
                torch.set_num_threads(threads)
            return {"seconds": sw.seconds, "peak_rss_mb": common.peak_rss_mb(), "loss": loss.item()}
        return step

    systems = {"base": variant(target_loss), "full-logits": variant(full_logits_loss),
               "unchunked-ce": variant(unchunked_target_loss), "checkpointing": variant(target_loss, ckpt_model,
                                                                                   checkpointing=True)}
    if threads > 1 and not args.skip_threads:
        systems["1-thread"] = variant(target_loss, n_threads=1)
    if not args.skip_compile:
        systems["compiled"] = variant(target_loss, common.fresh_copy(model), compiled=True)
    other = "fp32" if env.bf16 else "bf16"
    other_step = variant(target_loss, bf16=not env.bf16)
    warm = {name: fn()["seconds"] for name, fn in systems.items()}  # warm-up (the compiled variant compiles here)
    compile_seconds = warm.get("compiled")
    if compile_seconds is not None:
        print(f"torch.compile: first step {compile_seconds:.1f} s (compiling)", flush=True)
    load_start = common.machine()["load_average"]
    runs = common.interleave(systems, reps)
    if not args.skip_other_precision:
        first = other_step()  # the other precision: one warm-up-and-time run, more only when it is close
        other_runs = [first] if first["seconds"] > 2 * min(r["seconds"] for r in runs["base"]) else \
            [other_step() for _ in range(reps)]
        runs[other] = other_runs
    load_end = common.machine()["load_average"]
    losses = {name: rs[0]["loss"] for name, rs in runs.items()}
    for name in ("full-logits", "unchunked-ce", "checkpointing", "1-thread", "compiled"):  # the same computation
        if name in losses and abs(losses[name] - losses["base"]) > 1e-4 * max(1.0, abs(losses["base"])):
            raise SystemExit(f"lever {name!r} changed the loss: {losses[name]} vs base {losses['base']}")
    results = {name: {"seconds": common.stats([r["seconds"] for r in rs]),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "first_loss": losses[name]}
               for name, rs in runs.items()}
    print(f"levers, one step of batch 10, {env.precision}, {threads} threads, best of {reps}; "
          f"load average {load_start} -> {load_end}")
    base = results["base"]["seconds"]["min"]
    for name, r in results.items():
        print(f"  {name:<14} {r['seconds']['min']:7.3f} s (median {r['seconds']['median']:.3f}, "
              f"{r['seconds']['min'] / base:5.2f}x base)  peak RSS {r['peak_rss_mb']:6.0f} MiB  loss {r['first_loss']:.4f}")
    ratios = [common.ratio(f"lever: {name} / base step time", r["seconds"]["min"] / base, None,
                           f"peak RSS {r['peak_rss_mb']:.0f} vs {results['base']['peak_rss_mb']:.0f} MiB")
              for name, r in results.items() if name != "base"]
    common.write(args, {"part": "levers", "precision": env.reason, "reps": reps,
                        "load_average_start_end": [load_start, load_end], "variants": results, "ratios": ratios,
                        "compile_first_step_seconds": compile_seconds})


if __name__ == "__main__":
    main()
