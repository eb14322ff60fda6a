"""Training throughput: prefixtune's trainer vs PEFT PrefixTuning + HF Trainer, the floor, full fine-tuning.

    python bench/bench_train.py [--quick] [--reps 3] [--pairs 210] [--device auto] [--systems a,b] [--json out.json]

Same model (SmolLM2-135M), data (a fixed sample of E2E dev pairs, encoded once by prefixtune's
`encode`), batch 10, lr, precision, prefix length 10 and reparametrization MLP (hidden 512, input
width = PEFT's token_dim) for every system. Each system trains one epoch over the same pairs, once
per repetition, the systems interleaved (rotating order) so that other load on the machine hits
all alike. Step 1 of each run is warm-up: throughput = tokens of steps 2..N / time from the end of
step 1 to the end of step N.

  prefixtune         prefixtune.train.train() (length-bucketed batches, LM head at target positions)
  prefixtune+compile the same with TrainConfig(compile=True) (`train --compile`: every transformer layer
                     compiled). Its untimed warm-up compiles one batch shape; the first timed run
                     meets new lengths and recompiles once (dynamic), so its best run is the figure
  peft+grouped       PEFT 0.21.2 PrefixTuningConfig(prefix_projection) + HF Trainer,
                     train_sampling_strategy="group_by_length" (transformers 5's group_by_length=True)
  peft               the same with the Trainer's default random sampler
  floor              the frozen LM alone on prefixtune's batches: backward through activations only
                     (the input embeddings require grad), LM head at target positions; no prefix
  full-ft            full fine-tuning on prefixtune's batches: every weight trained (AdamW), same loss

On a GPU (`--device`: cuda where one is available) every system runs there, the HF Trainer too, in
bf16 autocast by default and with sdpa attention; each step's end is read after torch.cuda.synchronize.

FLOP utilisation = counted FLOPs of a step / step time / measured matmul peak (1024^3 fp32 or bf16
matmul at the same threads; 8192^3 on a GPU). FLOPs count real (unpadded) tokens only:
  per real token:     4 * W   (W = weights of the transformer layers' matmuls; forward 2W, backward to
                               the activations 2W; full fine-tuning adds 2W for weight gradients: 6W)
  per real token and layer: 12 * d * ctx  (attention scores and mixing, forward 4*d*ctx, backward
                               8*d*ctx; ctx = prefix length + position, causal; d = heads * head_dim)
  per target token:   4 * d * V (LM head forward + backward to the hidden state; 6 * d * V full-ft)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import common
from common import pt

from prefixtune.batching import IGNORE, collate, encode, length_bucketed_batches

BATCH, LR, PREFIX_LEN, MLP_HIDDEN = 10, 1e-3, 10, 512
SYSTEMS = ("prefixtune", "prefixtune+compile", "peft+grouped", "peft", "floor", "full-ft")


def encoded_pairs(tok, pairs):
    return [encode(tok, p.source, p.target, False, 256, 128) for p in pairs]


def our_batches(tok, pairs, batch_size: int):
    """The batches prefixtune's trainer makes in epoch 0 (seed 0), in order."""
    enc = encoded_pairs(tok, pairs)
    lengths = [len(e.input_ids) for e in enc]
    return [collate([enc[i] for i in b], tok.pad_token_id, False)
            for b in length_bucketed_batches(lengths, batch_size, 0, 0)]


def token_counts(batch) -> tuple[int, int, int]:
    """(real tokens, target tokens, padded tokens) of a batch."""
    return (int(batch.attention_mask.sum()), int((batch.labels[:, 1:] != IGNORE).sum()),
            batch.attention_mask.numel())


def throughput(step_ends: list[float], counts: list[tuple[int, int]]) -> dict:
    """Steps 2..N: seconds per step, real and target tokens per second."""
    n = len(step_ends) - 1
    if n < 1:
        return {}  # a one-step warm-up run
    seconds = step_ends[-1] - step_ends[0]
    real = sum(c[0] for c in counts[1:n + 1])
    target = sum(c[1] for c in counts[1:n + 1])
    padded = sum(c[2] for c in counts[1:n + 1])
    return {"seconds": seconds, "s_per_step": seconds / n, "real_tok_s": real / seconds,
            "target_tok_s": target / seconds, "steps": n, "real_tokens": real, "target_tokens": target,
            "padding_fraction": 1 - real / padded}


# ---------------------------------------------------------------------------------------------
# The systems. Each trains one epoch and returns throughput(...) of its steps 2..N.


def prefix_config(mlp_input_dim: int | None) -> pt.PrefixConfig:
    return pt.PrefixConfig(length=PREFIX_LEN, reparam="mlp", mlp_hidden=MLP_HIDDEN, mlp_input_dim=mlp_input_dim)


def run_prefixtune(model, tok, pairs, env, mlp_input_dim=None, batch_size=BATCH, compile_=False) -> dict:
    import json

    from prefixtune.train import TrainConfig, train

    torch.manual_seed(0)
    pm = pt.PrefixModel(model, prefix_config(mlp_input_dim))
    cfg = TrainConfig(lr=LR, epochs=1, batch_size=batch_size, checkpoint_every=10 ** 6, log_every=10 ** 6,
                      bf16=env.bf16, max_source_len=256, max_target_len=128, compile=compile_)
    with tempfile.TemporaryDirectory() as out:
        train(pm, tok, pairs, [], cfg, out, print_fn=lambda s: None)
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    # written at the end of each step (1 ms resolution), after the trainer reads the step's loss and checks
    # the parameters: on a GPU too, the time the step's work took. The trainer takes the GPU when one
    # is visible: common.resolve_device leaves none visible for a CPU run.
    ends = [r["time"] for r in log if "loss" in r]
    counts = [token_counts(b) for b in our_batches(tok, pairs, batch_size)]
    assert [c[1] for c in counts] == [r["target_tokens"] for r in log if "loss" in r], "batches differ from the trainer's"
    return throughput(ends, counts)


def make_peft(model):
    from peft import PrefixTuningConfig, get_peft_model

    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN, prefix_projection=True,
                             encoder_hidden_size=MLP_HIDDEN)
    return get_peft_model(model, cfg)


def run_peft(peft_model, tok, pairs, env, grouped: bool, batch_size=BATCH) -> dict:
    """PEFT + HF Trainer as a user would run it: the model's own loss (LM head at every position)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    enc = encoded_pairs(tok, pairs)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc]
    counts: list[tuple[int, int]] = []
    ends: list[float] = []

    def collator(features):
        b = collate([type(enc[0])(f["input_ids"], f["labels"]) for f in features], tok.pad_token_id, False)
        counts.append(token_counts(b))  # the Trainer consumes batches in the order they are collated
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(common.now(env.device))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=LR,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
            train_sampling_strategy="group_by_length" if grouped else "random", bf16=env.bf16,
            use_cpu=env.device == "cpu",  # the bench's device: the CPU, or the one GPU left visible
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[StepEnds()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training summary line, not needed here
        trainer.train()
    return throughput(ends, counts)


def run_floor(model, tok, pairs, env, batch_size=BATCH) -> dict:
    """The frozen LM's own cost: forward, LM head at targets, backward through the activations, no prefix."""
    batches = [b.to(env.device) for b in our_batches(tok, pairs, batch_size)]
    ends = []
    for b in batches:
        floor_step(model, b, env.bf16)
        ends.append(common.now(env.device))
    return throughput(ends, [token_counts(b) for b in batches])


def floor_step(model, b, bf16: bool) -> None:
    """One floor step on batch `b`: forward, LM head at targets, backward to the input embeddings only."""
    with torch.autocast(b.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        embeds = model.get_input_embeddings()(b.input_ids).detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=b.attention_mask,
                                  use_cache=False).last_hidden_state
        targets = b.labels[:, 1:]
        keep = targets != IGNORE
        loss = torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden[:, :-1][keep]).float(),
                                                 targets[keep])
    loss.backward()


def run_full(model, tok, pairs, env, batch_size=BATCH) -> dict:
    """Full fine-tuning: every weight trained with AdamW, the same target-position loss as prefixtune."""
    from prefixtune.engine import target_loss

    batches = [b.to(env.device) for b in our_batches(tok, pairs, batch_size)]
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ends = []
    try:
        for b in batches:
            with torch.autocast(b.input_ids.device.type, dtype=torch.bfloat16, enabled=env.bf16):
                loss = target_loss(model, None, b.input_ids, b.attention_mask, b.labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(common.now(env.device))
    finally:
        for p in params:
            p.requires_grad_(False)
    return throughput(ends, [token_counts(b) for b in batches])


# ---------------------------------------------------------------------------------------------
# FLOPs


def layer_weights(model) -> int:
    """W: weights of the transformer layers' matmuls (embeddings and norms excluded)."""
    return sum(m.weight.numel() for m in model.base_model.layers.modules() if isinstance(m, torch.nn.Linear))


def step_flops(model, batches, prefix_len: int, weight_grads: bool) -> float:
    """Mean FLOPs per step over batches[1:] (the timed steps); see the module docstring."""
    c = model.config
    d = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w, layers, vocab = layer_weights(model), c.num_hidden_layers, c.vocab_size
    per_weight = 6 if weight_grads else 4
    total = 0.0
    for b in batches[1:]:
        real, target, _ = token_counts(b)
        lengths = b.attention_mask.sum(-1)
        ctx = sum(int(n) * prefix_len + int(n) * (int(n) + 1) // 2 for n in lengths)  # sum over real queries
        total += per_weight * w * real + 12 * d * ctx * layers + per_weight * c.hidden_size * vocab * target
    return total / max(1, len(batches) - 1)


def main() -> None:
    ap = common.parser(__doc__, cuda=True)
    ap.add_argument("--pairs", type=int, default=210, help="E2E pairs per epoch (steps = pairs / batch; 210: 20 timed "
                    "steps per system and repetition after the warm-up step, as issue 20 asks)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {', '.join(SYSTEMS)} (a ratio is printed where both of its systems ran)")
    args = ap.parse_args()
    chosen = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown or not chosen:
        ap.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    env = common.setup(args)
    n_pairs, reps = (12, 1) if args.quick else (args.pairs, args.reps)
    batch = 4 if args.quick else BATCH

    model, tok = common.load(args.quick, env.device)
    peft_model = make_peft(common.fresh_copy(model))  # also gives PEFT's token_dim, our MLP input width
    full_model = common.fresh_copy(model) if "full-ft" in chosen else None
    token_dim = peft_model.peft_config["default"].token_dim
    pairs = common.e2e_pairs(n_pairs)

    every = {
        "prefixtune": lambda ps: run_prefixtune(model, tok, ps, env, token_dim, batch),
        "prefixtune+compile": lambda ps: run_prefixtune(model, tok, ps, env, token_dim, batch, compile_=True),
        "peft+grouped": lambda ps: run_peft(peft_model, tok, ps, env, True, batch),
        "peft": lambda ps: run_peft(peft_model, tok, ps, env, False, batch),
        "floor": lambda ps: run_floor(model, tok, ps, env, batch),
        "full-ft": lambda ps: run_full(full_model, tok, ps, env, batch),
    }
    assert tuple(every) == SYSTEMS
    systems = {name: (lambda run=every[name]: run(pairs)) for name in chosen}
    warm = pairs[:batch] if not args.quick else []
    # untimed warm-up of every path (kernels, allocator; compiling): one step each
    for name in chosen if warm else ():
        if name != "peft":  # the same path as peft+grouped
            every[name](warm)
    load_start = common.machine()["load_average"]
    runs = common.interleave(systems, reps)
    load_end = common.machine()["load_average"]

    results = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["target_tok_s"])
        results[name] = {"target_tok_s": common.stats([r["target_tok_s"] for r in rs]),
                         "real_tok_s": common.stats([r["real_tok_s"] for r in rs]),
                         "s_per_step": common.stats([r["s_per_step"] for r in rs]), "best_run": best}
    peak = common.matmul_peak(env.bf16, env.device)
    batches = our_batches(tok, pairs, batch)
    util = {}
    for name, prefix_len, full in (("prefixtune", PREFIX_LEN, False), ("floor", 0, False), ("full-ft", 0, True)):
        if name in results:
            flops = step_flops(model, batches, prefix_len, full)
            util[name] = flops / results[name]["s_per_step"]["min"] / peak

    def best(name, key="target_tok_s"):
        return max(results[name][key]["all"])

    def med(name, key="target_tok_s"):
        return results[name][key]["median"]

    def have(*names):
        return all(n in results for n in names)

    ratios = []
    if have("prefixtune", "peft+grouped"):
        ratios.append(common.ratio("train: prefixtune / PEFT+Trainer group_by_length (target tok/s)",
                                   best("prefixtune") / best("peft+grouped"), ">= 1.5",
                                   f"median {med('prefixtune') / med('peft+grouped'):.2f}"))
    if have("prefixtune", "peft"):
        ratios.append(common.ratio("train: prefixtune / PEFT+Trainer default (target tok/s)",
                                   best("prefixtune") / best("peft"), None, f"median {med('prefixtune') / med('peft'):.2f}"))
    if have("prefixtune", "prefixtune+compile"):
        ratios.append(common.ratio("train: prefixtune --compile / prefixtune (target tok/s)",
                                   best("prefixtune+compile") / best("prefixtune"), None,
                                   f"median {med('prefixtune+compile') / med('prefixtune'):.2f}; > 1 = compiling wins"))
    if have("prefixtune", "floor"):
        ratios.append(common.ratio("train: prefixtune step / floor step (s per target token)",
                                   best("floor") / best("prefixtune"), None, "1.0 = the prefix costs nothing"))
    if have("floor", "peft+grouped"):  # the bound on the first ratio: no prefix step is cheaper than the floor
        ceiling = best("floor") / best("peft+grouped")
        ratios.append(common.ratio("train: floor / PEFT+Trainer group_by_length (the most any prefix step can reach)",
                                   ceiling, None, f"median {med('floor') / med('peft+grouped'):.2f}"
                                   + (f"; the 1.5 goal needs a step {1.5 / ceiling:.2f}x below the floor" if ceiling < 1.5
                                      else "")))
    if have("prefixtune", "full-ft"):
        ratios.append(common.ratio("train: prefixtune step / full fine-tuning step", best("full-ft") / best("prefixtune"), None))
    if have("prefixtune", "floor", "full-ft"):
        ratios.append(common.ratio("train: FLOP utilisation of a prefixtune step", util["prefixtune"], ">= 0.6",
                                   f"peak {peak / 1e9:.0f} GFLOP/s; floor {util['floor']:.2f}, full-ft {util['full-ft']:.2f}"))
    print(f"training, {n_pairs} E2E pairs, batch {batch}, prefix {PREFIX_LEN} + MLP {MLP_HIDDEN}, {env.precision} "
          f"on {env.gpu or 'cpu'}, {env.threads} threads, {reps} interleaved reps; load average {load_start} -> "
          f"{load_end}")
    print(f"{'system':<19} {'target tok/s best/median':>26} {'real tok/s best/median':>26} {'s/step best/median':>20}")
    for name, r in results.items():
        t, real, s = r["target_tok_s"], r["real_tok_s"], r["s_per_step"]
        print(f"{name:<19} {t['max']:>12.1f} {t['median']:>12.1f} {real['max']:>13.1f} {real['median']:>12.1f} "
              f"{s['min']:>10.3f} {s['median']:>9.3f}")
    common.write(args, {"part": "train", "precision": env.reason, "threads": env.threads, "pairs": n_pairs,
                        "batch": batch, "prefix_length": PREFIX_LEN, "mlp_hidden": MLP_HIDDEN, "lr": LR,
                        "reps": reps, "load_average_start_end": [load_start, load_end], "systems": results,
                        "matmul_peak_flops": peak, "flop_utilisation": util, "ratios": ratios})


if __name__ == "__main__":
    main()
