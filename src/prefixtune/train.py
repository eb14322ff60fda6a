"""The training loop: one plain loop for every method, readable top to bottom.

data pairs -> method.encode -> length-bucketed batches -> method.loss (frozen LM + the method)
-> AdamW + linear warm-up/decay + clipping (+ gradient accumulation) -> checkpoints, dev loss,
best artifact. Runs unchanged under `accelerate launch` (Accelerate is a no-op on one CPU).
The loop knows only the method protocol (`methods.base.Method`): what trains (`trainable()`),
the loss, and what is saved (`export()`).

A checkpoint is ONE safetensors file written atomically: trainable parameters (MLP included),
optimizer moments, best artifact so far, and the loop state (step, epoch, position in the epoch,
scheduler, RNG, the settings) as JSON metadata. A run killed at any moment resumes from the last
checkpoint to the same final artifact as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from accelerate import Accelerator

from .batching import Encoded, length_bucketed_batches
from .compiling import compiled_layers
from .config import TrainConfig
from .methods import Method, get_method, save_artifact
from .precision import frozen_matmul_weights_in
from .methods.weights import WeightArtifact
from .prefix import MergedPrefix, read_safetensors
from .files import atomic_write_bytes

# Settings a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "time_budget_s", "compile")  # compile: equal within rounding


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where and what was kept."""


class ResumeMismatch(TrainingError):
    """A checkpoint asked to be resumed was made with other settings, data or model (each difference named)."""


@dataclass
class LoopState:
    """Everything besides tensors needed to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dev_loss: float = math.inf
    best_step: int | None = None      # the step whose state is the best artifact
    evaluated_step: int | None = None  # the step last measured on the dev set (never measured twice)
    bad_evals: int = 0
    train_seconds: float = 0.0
    done: bool = False


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _encode_all(method: Method, tokenizer, pairs, cfg: TrainConfig) -> list[Encoded]:
    return [method.encode(tokenizer, p.source, p.target, cfg.max_source_len, cfg.max_target_len) for p in pairs]


def step_timer(method: Method, tokenizer, pairs, cfg: TrainConfig) -> Callable[[bool], float]:
    """`time_step(bf16)`: seconds of one training step (forward and backward, no update) on the run's first
    `batch_size` pairs, in bf16 or fp32 as `train` runs it; for `precision.choose_on_step`.

    It leaves no gradient and no trace in the random state, so a run that timed its step first trains exactly
    like one that did not."""
    batch = method.collate(_encode_all(method, tokenizer, list(pairs)[:cfg.batch_size], cfg),
                           tokenizer.pad_token_id).to(method.model.device)
    params = list(method.trainable().values())
    device = method.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time_step(bf16: bool) -> float:
        was_training = method.training
        method.train()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    frozen_matmul_weights_in(method.model, torch.bfloat16 if bf16 else None, keep=params):
                sync()
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = method(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                                  loss_on_targets=True)
                loss.backward()
                sync()
                return time.perf_counter() - start
        finally:
            for p in params:
                p.grad = None
            method.train(was_training)

    return time_step


@torch.no_grad()
def dev_loss(method: Method, encoded: list[Encoded], pad_id: int, batch_size: int) -> float:
    """Mean loss over the dev pairs (weighted by target tokens, or by rows for classification)."""
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        b = method.collate(encoded[start:start + batch_size], pad_id).to(method.model.device)
        loss = method.loss(b)
        weight = b.n_target_tokens or b.input_ids.shape[0]
        total += loss.item() * weight
        count += weight
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _artifact_from(tensors: dict[str, torch.Tensor], soft: bool, meta: dict):
    """The best artifact kept in a checkpoint ('soft': a mixable one)."""
    return (MergedPrefix if soft else WeightArtifact).from_tensors(tensors, meta)


def save_checkpoint(path: Path, method: Method, optimizer, scheduler, state: LoopState, best, extra: dict,
                    cfg: TrainConfig) -> None:
    params = method.trainable()
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    names = {id(p): n for n, p in params.items()}
    opt_state = optimizer.state_dict()
    index_to_name = {}
    for group, group_state in zip(optimizer.param_groups, opt_state["param_groups"]):
        for p, idx in zip(group["params"], group_state["params"]):
            index_to_name[idx] = names[id(p)]
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"optim.{index_to_name[idx]}.{key}"] = torch.as_tensor(value).contiguous()
    if best is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best.tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": "prefixtune.checkpoint/2",
        "state": json.dumps(asdict(state)),
        "scheduler": json.dumps(scheduler.state_dict()),
        "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]),
        "method": method.name,
        "method_config": method.config.to_json(),
        "train_config": json.dumps(asdict(cfg)),
        "best_meta": json.dumps({"soft": bool(best is not None and best.mixable), "meta": best.meta if best else {}}),
        "extra": json.dumps(extra),
    }
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))


def check_resumable(path: Path, method: Method, cfg: TrainConfig) -> None:
    """Refuse to resume with other settings than the checkpoint's, naming each difference."""
    _, meta = read_safetensors(path)
    if meta.get("format") != "prefixtune.checkpoint/2":
        raise TrainingError(f"{path}: not a prefixtune training checkpoint (or one of an older version: "
                            "start a new output folder)")
    diffs = []
    if meta["method"] != method.name:
        diffs.append(f"method {meta['method']!r} -> {method.name!r}")
    saved_cfg = get_method(meta["method"]).config_class.from_dict(json.loads(meta["method_config"]))
    if saved_cfg != method.config:
        a, b = saved_cfg.to_dict(), method.config.to_dict()
        diffs += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    saved_train, now = json.loads(meta["train_config"]), asdict(cfg)
    diffs += [f"{k} {saved_train.get(k)!r} -> {now.get(k)!r}" for k in sorted(now)
              if k not in RESUMABLE_CHANGES and saved_train.get(k) != now.get(k)]
    if diffs:
        raise ResumeMismatch(f"{path}: this run was trained with other settings; resuming would mix them: "
                            f"{'; '.join(diffs)}. Resume with the same settings or start a new output folder")


def load_checkpoint(path: Path, method: Method, optimizer, scheduler):
    tensors, meta = read_safetensors(path)
    params = method.trainable()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    # rebuild the optimizer state dict in torch's own index-based layout
    opt_sd = optimizer.state_dict()
    name_of = {id(p): n for n, p in params.items()}
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    index_of = {name_of[id(p)]: idx for idx, p in enumerate(ordered)}
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            pname, field_name = key[len("optim."):].rsplit(".", 1)
            state.setdefault(index_of[pname], {})[field_name] = value
    groups = json.loads(meta["param_groups"])
    for g, saved in zip(opt_sd["param_groups"], groups):
        saved["params"] = g["params"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    best_tensors = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    best_meta = json.loads(meta["best_meta"])
    best = _artifact_from(best_tensors, best_meta["soft"], best_meta["meta"]) if best_tensors else None
    return LoopState(**json.loads(meta["state"])), best, json.loads(meta.get("extra", "{}"))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """One training run's parts that outlive a step: what `train()` measures and records.

    The loop advances `state`; `evaluate()` measures the dev loss and keeps the best artifact,
    `checkpoint()` writes everything needed to resume. Explicit fields instead of closures over the
    loop's locals, so what each of them reads and changes is visible here."""

    method: Method
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dev_enc: list[Encoded]
    pad_id: int
    ckpt_path: Path
    log_path: Path
    meta: dict                        # recorded in every checkpoint and in the artifact
    is_main: bool                     # the process that writes files (one, under several processes)
    device_type: str
    print_fn: Callable[[str], None]
    state: LoopState = field(default_factory=LoopState)
    best: object = None               # the best artifact so far (MergedPrefix or WeightArtifact)

    def checkpoint(self) -> None:
        if self.is_main:
            save_checkpoint(self.ckpt_path, self.method, self.optimizer, self.scheduler, self.state, self.best,
                            self.meta, self.cfg)

    def evaluate(self) -> bool:
        """Dev loss of the current state; keeps the best artifact. Returns True when early stopping says stop.

        Dropout is off while measuring and exporting (eval mode), and back on for the next steps."""
        state, method = self.state, self.method
        if not self.dev_enc or state.evaluated_step == state.step:
            return False
        method.eval()
        try:
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                loss = dev_loss(method, self.dev_enc, self.pad_id, self.cfg.batch_size)
            if not math.isfinite(loss):
                raise TrainingError(f"dev loss became {loss} at step {state.step}; the last good checkpoint is kept "
                                    f"at {self.ckpt_path}; try a lower --lr")
            improved = loss < state.best_dev_loss
            if improved:
                state.best_dev_loss, state.best_step, state.bad_evals = loss, state.step, 0
                self.best = method.export()
            else:
                state.bad_evals += 1
        finally:
            method.train()
        state.evaluated_step = state.step
        self.print_fn(f"  dev loss {loss:.4f}{' (best)' if improved else ''} at step {state.step}")
        if self.is_main:
            _append_log(self.log_path, {"step": state.step, "epoch": state.epoch, "dev_loss": loss})
        return self.cfg.patience is not None and state.bad_evals >= self.cfg.patience


def train(method: Method, tokenizer, train_pairs, dev_pairs, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = False, print_fn: Callable[[str], None] = print, extra_meta: dict | None = None,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Train `method`'s parameters; writes out_dir/{METHOD.safetensors, checkpoint.safetensors, log.jsonl}.

    `progress(record)` is called after every optimizer step (step, total, loss, tokens/s, ETA).
    """
    out = Path(out_dir)
    ckpt_path, log_path = out / "checkpoint.safetensors", out / "log.jsonl"
    artifact_path = out / f"{method.name}.safetensors"
    if not train_pairs:
        raise TrainingError("no training examples")
    if ckpt_path.exists() and not resume:
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue that run, or choose a new --out folder")
    if resume and ckpt_path.exists():
        check_resumable(ckpt_path, method, cfg)
    out.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_enc_dec = method.layout.is_encoder_decoder
    pad_id = tokenizer.pad_token_id
    train_enc = _encode_all(method, tokenizer, train_pairs, cfg)
    dev_enc = _encode_all(method, tokenizer, list(dev_pairs)[:cfg.dev_max_examples], cfg)
    lengths = [len(e.input_ids) + (len(e.labels) if is_enc_dec else 0) for e in train_enc]
    world = accelerator.num_processes
    n_batches = len(length_bucketed_batches(lengths, cfg.batch_size, cfg.seed, 0)) // world * world
    steps_per_epoch = math.ceil(n_batches / world / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    params = list(method.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))
    run = _Run(method, cfg, optimizer, scheduler, dev_enc, pad_id, ckpt_path, log_path, dict(extra_meta or {}),
               accelerator.is_main_process, accelerator.device.type, print_fn)
    if resume and ckpt_path.exists():
        run.state, run.best, _ = load_checkpoint(ckpt_path, method, optimizer, scheduler)
        print_fn(f"resumed from {ckpt_path} at step {run.state.step} (epoch {run.state.epoch + 1}, "
                 f"batch {run.state.batch_in_epoch})")
    model, optimizer = accelerator.prepare(method, optimizer)  # DDP over several processes; identity on one CPU
    run.optimizer = optimizer
    rank = accelerator.process_index
    if world > 1:
        print_fn(f"{world} processes: each takes every {world}th batch; gradients are averaged")
    if not accelerator.is_main_process:
        print_fn = run.print_fn = _quiet
    state = run.state  # the loop below advances it; run.evaluate / run.checkpoint read and record it

    # bf16: the frozen linear weights stored in bf16 for the run (autocast would recast them on every
    # forward; the numbers are identical), the originals put back before the artifact is exported
    with frozen_matmul_weights_in(method.model, torch.bfloat16 if cfg.bf16 else None, keep=params), \
            (compiled_layers(method) if cfg.compile else contextlib.nullcontext()):
        started = time.time() - state.train_seconds
        tokens_seen, rows_seen, window_start = 0, 0, time.time()
        stop = state.done
        method.train()  # the method's own modules (e.g. LoRA dropout); the frozen base stays in eval mode
        while not stop and state.epoch < cfg.epochs:
            # every process sees the same batch list and takes every world-th batch (equal counts: DDP steps in lockstep)
            batches = length_bucketed_batches(lengths, cfg.batch_size, cfg.seed, state.epoch)[:n_batches]
            for bi in range(state.batch_in_epoch, len(batches)):
                if bi % world != rank:  # each process takes its share of the batches
                    continue
                batch = method.collate([train_enc[i] for i in batches[bi]], pad_id).to(accelerator.device)
                # through the (possibly DDP-wrapped) module, so gradients are averaged across processes
                with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                                 loss_on_targets=True)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}, "
                                        f"batch {bi}); the last good checkpoint is kept at {ckpt_path}"
                                        f"{'' if ckpt_path.exists() else ' (none written yet)'}; try a lower --lr")
                accelerator.backward(loss / cfg.grad_accum)
                tokens_seen += batch.n_target_tokens
                rows_seen += batch.input_ids.shape[0]
                if (bi // world + 1) % cfg.grad_accum and bi + world < len(batches):
                    continue
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if not all(torch.isfinite(p).all() for p in params):
                    raise TrainingError(f"parameters became NaN or inf at step {state.step + 1}; the last good checkpoint "
                                        f"is kept at {ckpt_path}; try a lower --lr")
                state.step += 1
                state.batch_in_epoch = bi + 1
                state.train_seconds = time.time() - started
                record = {"step": state.step, "epoch": state.epoch, "loss": loss.item(),
                          "lr": scheduler.get_last_lr()[0], "target_tokens": batch.n_target_tokens}
                if accelerator.is_main_process:
                    _append_log(log_path, record)
                eta = state.train_seconds / state.step * (total_steps - state.step)
                if progress is not None:
                    progress({**record, "total": total_steps, "eta_s": eta,
                              "tokens_per_s": batch.n_target_tokens / max(1e-9, time.time() - window_start),
                              "examples_per_s": batch.input_ids.shape[0] / max(1e-9, time.time() - window_start)})
                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    # classifiers have no target tokens: their speed is in examples
                    speed = f"{tokens_seen / elapsed:.0f} target tok/s" if tokens_seen else f"{rows_seen / elapsed:.1f} examples/s"
                    print_fn(f"step {state.step}/{total_steps} epoch {state.epoch + 1} loss {loss.item():.4f} {speed} "
                             f"ETA {eta:.0f}s")
                    tokens_seen, rows_seen, window_start = 0, 0, time.time()
                elif progress is not None:
                    window_start, tokens_seen, rows_seen = time.time(), 0, 0
                if cfg.eval_every and state.step % cfg.eval_every == 0 and run.evaluate():
                    stop = True
                out_of_time = cfg.time_budget_s is not None and state.train_seconds >= cfg.time_budget_s
                if out_of_time:
                    print_fn(f"time budget of {cfg.time_budget_s:g} s reached at step {state.step}/{total_steps}")
                if state.step >= total_steps or out_of_time:
                    stop = True
                if stop:
                    run.evaluate()  # the final state always competes for best (a no-op if this step was just evaluated)
                if stop or state.step % cfg.checkpoint_every == 0:
                    state.done = stop
                    run.checkpoint()
                if stop:
                    break
            if not stop:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if not cfg.eval_every and run.evaluate():
                    stop = state.done = True
                run.checkpoint()
        if dev_enc and state.evaluated_step != state.step:
            run.evaluate()  # e.g. a run resumed after its last step, or one with no step at all
    method.eval()  # the artifact is exported (and the method handed back) with dropout off
    final = run.best if run.best is not None else method.export()
    final.meta.update({"train": asdict(cfg), **run.meta})
    if accelerator.is_main_process:
        save_artifact(final, artifact_path, model=method.model)
    return {"steps": state.step, "best_dev_loss": state.best_dev_loss, "best_step": state.best_step,
            "stopped_early": state.step < total_steps, "total_steps": total_steps, "train_seconds": state.train_seconds,
            "artifact_path": str(artifact_path), "artifact": final, "trainable_params": method.num_trainable()}


def _quiet(_: str) -> None:
    pass


def _append_log(path: Path, record: dict) -> None:
    """One JSON object per line; non-finite numbers become null (bare NaN is not JSON)."""
    record = {"time": round(time.time(), 3),
              **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
