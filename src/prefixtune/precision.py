"""bf16 or fp32, and how many threads: chosen by timing this machine, not by reading CPU flags.

A CPU that lists `avx512_bf16` can still run bf16 autocast 2x slower than fp32 (measured on a
Xeon), and one without it can win with bf16 (an AMD EPYC did). So the answer is measured: a
step-shaped workload (transformer-layer matmuls, forward + backward to the activations, as in
prefix training) is timed in fp32 and in bf16 autocast, at a few thread counts, interleaved, best
of a few repetitions; bf16 wins where it is at least `BF16_MARGIN` faster. The answer is cached per machine in
`~/.cache/prefixtune/precision.json`, keyed by CPU (or GPU) model, usable core count and torch
version, so the timing (a few seconds; ~10 s where bf16 is emulated) runs once. Where the workload's two
times are within 2x of each other it does not settle the choice: a training run then times its own
step in both precisions (`choose_on_step`, called by `experiments.run_training`) and caches that
answer under the machine and the model. The reason line
records the load average at measurement time: on a machine shared with other jobs, fewer threads
can win (measured here: 1 thread 6x faster than 2 at load average 18); delete the file to measure
again.

    from prefixtune.precision import choose, resolve_bf16
    p = choose()                 # Precision(bf16=False, threads=2, reason="fp32: bf16 autocast measured ...")
    bf16 = resolve_bf16("auto")  # choose + set the thread count + print the one-line reason

An explicit choice ("fp32", "bf16", or $PREFIXTUNE_PRECISION) skips the measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError

OPTIONS = ("auto", "fp32", "bf16")
# bf16 is chosen only when it is at least this much faster: two probes in one process on an AMX Xeon
# measured fp32/bf16 = 1.28 and then 0.98, so a bare "faster wins" let noise pick the precision of a
# whole run (issue 20); fp32, the exact reference, keeps anything closer.
BF16_MARGIN = 1.10
# The step-shaped workload settles the choice only when one precision is at least this much faster; closer
# than that, a training run times its own step (`choose_on_step`). The workload is a proxy: on a Xeon without
# AMX it said bf16 2.33x slower where the real SmolLM2 step was 1.8x slower, and on an AMX Xeon two probes read
# fp32/bf16 1.28 and 0.98 where the real step was 1.34x faster in bf16 (issue 20).
SETTLED_BY_WORKLOAD = 2.0
ENV_VAR = "PREFIXTUNE_PRECISION"
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class Precision:
    bf16: bool
    threads: int
    reason: str
    settled: bool = True  # False: the workload was too close to call; a training run times its own step

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def device_model(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: str = "cpu") -> str:
    """What the answer depends on: the chip, the core count we may use, and torch's kernels."""
    cores = "" if device.startswith("cuda") else f" x{available_cores()}"
    return f"{device_model(device)}{cores} | torch {torch.__version__}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefixtune"


def thread_candidates(cores: int) -> list[int]:
    return sorted({1, max(1, cores // 2), cores})


def _step_workload(device: str, rows: int = 4, seq: int = 32, layers: int = 2):
    """Two layers shaped like SmolLM2-135M's (576 wide, 9 query / 3 key-value heads, MLP 1536), frozen
    weights; gradients flow to the activations only, as in prefix training."""
    d, heads, kv_heads, ffn = 576, 9, 3, 1536
    head_dim = d // heads
    kv_d = kv_heads * head_dim
    g = torch.Generator().manual_seed(0)
    shapes = [(d + 2 * kv_d, d), (d, d), (ffn, d), (ffn, d), (d, ffn)] * layers
    weights = [(torch.randn(s, generator=g) / s[1] ** 0.5).to(device) for s in shapes]
    x0 = torch.randn(rows, seq, d, generator=g).to(device)

    def step():
        x = x0.clone().requires_grad_(True)
        h = x
        for i in range(0, len(weights), 5):
            qkv, o, gate, up, down = weights[i:i + 5]
            q, k, v = (h @ qkv.T).split([d, kv_d, kv_d], dim=-1)
            q = q.view(rows, seq, heads, head_dim).transpose(1, 2)
            k, v = (t.view(rows, seq, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
                    for t in (k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + a.transpose(1, 2).reshape(rows, seq, d) @ o.T
            h = h + (torch.nn.functional.silu(h @ gate.T) * (h @ up.T)) @ down.T
        h.float().square().mean().backward()
        return x.grad

    return step


def time_workload(device: str, bf16: bool, threads: int | None, reps: int = 3, give_up_after: float = float("inf")
                  ) -> float:
    """Best-of-`reps` seconds of one step-shaped forward+backward (after one untimed warm-up).

    Stops early once a timed run takes longer than `give_up_after` seconds (clearly the slower one).
    """
    before = torch.get_num_threads()
    if threads and not device.startswith("cuda"):
        torch.set_num_threads(threads)
    try:
        step = _step_workload(device)
        best = float("inf")
        for i in range(reps + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first run warms kernels and the allocator
                best = min(best, time.perf_counter() - t0)
                if best > give_up_after:
                    break
        return best
    finally:
        torch.set_num_threads(before)


def measure(device: str = "cpu", reps: int = 3, timer: Callable[..., float] = time_workload) -> dict:
    """Seconds per workload step: fp32 at each thread count, then bf16 vs fp32 at the best one.

    Rounds are interleaved so that other load on the machine hits every candidate alike. A bf16
    run more than 2x slower than fp32 stops early (on CPUs without native bf16 it is 10x slower).
    """
    cuda = device.startswith("cuda")
    candidates = [None] if cuda else thread_candidates(available_cores())
    times: dict[str, float] = {}
    for _ in range(2):
        for t in candidates:
            key = f"fp32@{t or 0}"
            times[key] = min(times.get(key, float("inf")), timer(device, False, t, reps))
    # more threads unless fewer are clearly faster (10%): other users' load makes small gaps noise
    fastest = min(times.values())
    best_t = max((t for t in candidates if times[f"fp32@{t or 0}"] <= 1.1 * fastest), key=lambda t: t or 0)
    key = f"@{best_t or 0}"
    for _ in range(2):
        times["bf16" + key] = min(times.get("bf16" + key, float("inf")),
                                  timer(device, True, best_t, reps, give_up_after=2 * times["fp32" + key]))
        if times["bf16" + key] > 2 * times["fp32" + key]:
            break
        times["fp32" + key] = min(times["fp32" + key], timer(device, False, best_t, reps))
    return times


def _verdict(fp32_s: float, bf16_s: float) -> tuple[bool, str, float]:
    """bf16 only where it is `BF16_MARGIN` faster; the verdict in words; the ratio of the two times (>= 1)."""
    bf16 = fp32_s >= BF16_MARGIN * bf16_s
    ratio = max(fp32_s, bf16_s) / min(fp32_s, bf16_s)
    if bf16:
        return bf16, f"fp32 measured {ratio:.2f}x slower", ratio
    if bf16_s < fp32_s:  # faster, but within the margin: noise could have made it so
        return bf16, f"bf16 autocast measured only {ratio:.2f}x faster (it needs {BF16_MARGIN:.2f}x)", ratio
    return bf16, f"bf16 autocast measured {ratio:.2f}x slower", ratio


def _conditions(device: str, threads: int) -> str:
    """Thread count and load average: other users' work skews timings, fewer threads can win under load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    thread_note = "" if device.startswith("cuda") else f", {threads} thread{'s' * (threads > 1)}"
    return f"{thread_note}; load average {load:.1f}"


def _compared(times: dict[str, float]) -> tuple[str, float, float]:
    """The thread count bf16 was timed at, and fp32's and bf16's seconds there (`measure`'s keys)."""
    at = next(k for k in times if k.startswith("bf16@")).split("@")[1]
    return at, float(times[f"fp32@{at}"]), float(times[f"bf16@{at}"])


def _decide(times: dict[str, float], device: str) -> tuple[bool, int, str, bool]:
    at, fp32, bf16 = _compared(times)
    threads = int(at) or torch.get_num_threads()
    chosen, verdict, ratio = _verdict(fp32, bf16)
    settled = ratio >= SETTLED_BY_WORKLOAD
    reason = (f"{'bf16' if chosen else 'fp32'}: {verdict} on {device_model(device)} (step-shaped workload: fp32 "
              f"{fp32 * 1e3:.0f} ms, bf16 {bf16 * 1e3:.0f} ms{_conditions(device, threads)})"
              + ("" if settled else f"; within {SETTLED_BY_WORKLOAD:g}x, so a training run times its own step"))
    return chosen, threads, reason, settled


def _settled_by(times) -> bool:
    """Whether recorded workload times settle the choice (entries written before `settled` was stored)."""
    try:
        _, fp32, bf16 = _compared(times)
        return max(fp32, bf16) / min(fp32, bf16) >= SETTLED_BY_WORKLOAD
    except (TypeError, KeyError, ValueError, StopIteration, ZeroDivisionError, AttributeError):
        return True  # nothing to go on: keep the recorded answer


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again and rewrite it


def _cache_path(cache: Path | None | bool) -> Path | None:
    return None if cache is False else Path(cache or cache_dir()) / CACHE_FILE


def _store(path: Path | None, key: str, entry: dict) -> None:
    if path is None:
        return
    from .files import atomic_write_bytes  # atomic: two processes measuring at once never leave half a file

    entries = _read_cache(path)
    entries[key] = {**entry, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_bytes(path, json.dumps(entries, indent=2).encode())


def _step_key(device: str, workload: str) -> str:
    return f"{machine_key(device)} | training step of {workload}"


def choose(option: str | None = None, device: str | None = None, cache: Path | None | bool = None,
           timer: Callable[..., float] = time_workload, workload: str | None = None) -> Precision:
    """The precision (and CPU thread count) to train and decode with.

    option: "auto" (measure, cached), "fp32" or "bf16"; None reads $PREFIXTUNE_PRECISION (default "auto").
    cache: folder of the cache file (default ~/.cache/prefixtune); False: measure without caching.
    workload: the model a run trains (its name); where a run on this machine already timed that model's own
    step (`choose_on_step`), that answer is returned, settled.
    """
    source = "argument"
    if option is None:
        option, source = os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}"
    option = option.strip().lower()
    if option not in OPTIONS:
        raise ConfigError(f"precision ({source}): must be one of {OPTIONS}, got {option!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_threads = torch.get_num_threads() if device.startswith("cuda") else available_cores()
    if option != "auto":
        return Precision(option == "bf16", default_threads, f"{option}: chosen explicitly ({source})")

    key = machine_key(device)
    path = _cache_path(cache)
    entries = _read_cache(path) if path is not None else {}
    for k in ([_step_key(device, workload)] if workload else []) + [key]:
        hit = entries.get(k)
        if isinstance(hit, dict) and {"bf16", "threads", "reason"} <= set(hit):
            return Precision(bool(hit["bf16"]), int(hit["threads"]), f"{hit['reason']}; cached in {path}",
                             settled=bool(hit.get("settled", _settled_by(hit.get("times_s")))))
    times = measure(device, timer=timer)
    bf16, threads, reason, settled = _decide(times, device)
    _store(path, key, {"bf16": bf16, "threads": threads, "reason": reason, "settled": settled, "times_s": times})
    return Precision(bf16, threads, reason, settled)


def choose_on_step(time_step: Callable[[bool], float], workload: str, threads: int, device: str = "cpu",
                   cache: Path | None | bool = None, reps: int = 3) -> Precision:
    """fp32 or bf16 by timing the run's own training step: `time_step(bf16)` returns the seconds of one step.

    One untimed step of each warms kernels, then `reps` rounds alternate which precision goes first (load that
    comes and goes hits both alike); best of the rounds, and bf16 only where it is `BF16_MARGIN` faster. The
    answer is cached under this machine and `workload` (the model's name), so it is timed once."""
    time_step(False), time_step(True)
    best = {False: float("inf"), True: float("inf")}
    for i in range(reps):
        for bf16 in ((False, True) if i % 2 == 0 else (True, False)):
            best[bf16] = min(best[bf16], time_step(bf16))
    fp32_s, bf16_s = best[False], best[True]
    bf16, verdict, _ = _verdict(fp32_s, bf16_s)
    reason = (f"{'bf16' if bf16 else 'fp32'}: {verdict} on {device_model(device)} (the training step of {workload}: "
              f"fp32 {fp32_s:.3f} s, bf16 {bf16_s:.3f} s, best of {reps}{_conditions(device, threads)})")
    _store(_cache_path(cache), _step_key(device, workload), {"bf16": bf16, "threads": threads, "reason": reason,
                                                             "settled": True, "times_s": {"fp32": fp32_s, "bf16": bf16_s}})
    return Precision(bf16, threads, reason)


def apply(precision: Precision, device: str = "cpu") -> None:
    """Set the thread count the choice was made with (CPU only)."""
    if not device.startswith("cuda"):
        torch.set_num_threads(precision.threads)


def resolve(option: str | None = "auto", print_fn: Callable[[str], None] | None = print,
            workload: str | None = None) -> Precision:
    """Choose (see `choose`), set the thread count, print which and why. An unsettled answer (`settled` False)
    is for a caller that can time the run's own step to refine (`choose_on_step`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = choose(option, device=device, workload=workload)
    apply(p, device)
    if print_fn is not None:
        print_fn(f"precision {p.reason}")
    return p


def resolve_bf16(option: str | None = "auto", print_fn: Callable[[str], None] | None = print) -> bool:
    """For `TrainConfig.bf16` where no training step can be timed: `resolve`'s answer, True for bf16."""
    return resolve(option, print_fn).bf16


# ---------------------------------------------------------------------------------------------
# Frozen weights stored in the compute dtype


@contextlib.contextmanager
def frozen_matmul_weights_in(model, dtype: torch.dtype | None, keep=()):
    """Within the block, the frozen weights and biases of `model`'s linear layers (nn.Linear, GPT-2's
    Conv1D) are stored in `dtype`; at exit the original float32 tensors are put back (the very same
    storage: exact).

    Under bf16 autocast a float32 weight is cast to bf16 on every forward (frozen weights are not in
    autocast's cast cache: it caches only leaves that require grad). Stored in bf16 once, the cast is
    a no-op and the numbers are the same: autocast rounds weights and biases to bf16 either way.
    `keep`: parameters left as they are (what the method trains). Parameters shared with other
    modules (a tied LM head is the embedding) are kept too: embeddings and norms are not autocast ops,
    and casting them would change the numbers. `dtype=None`: nothing is changed.
    """
    if dtype is None:
        yield model
        return
    # transformers: only to cast a model's weights; this module's measuring and flags do not need it (start-up time)
    from transformers.pytorch_utils import Conv1D

    keep_ids = {id(p) for p in keep}
    linear, other = set(), set()
    for module in model.modules():
        own = {id(p) for p in module.parameters(recurse=False)}
        (linear if isinstance(module, (torch.nn.Linear, Conv1D)) else other).update(own)
    frozen = [p for p in model.parameters() if id(p) in linear and id(p) not in other and id(p) not in keep_ids
              and not p.requires_grad and p.dtype == torch.float32]
    with _parameters_in(frozen, dtype):
        yield model


# ---------------------------------------------------------------------------------------------
# Decoding and serving: the whole frozen model in the compute precision (no autocast)


def decoding_dtype(option: str, device: str | None = None) -> torch.dtype | None:
    """The dtype a frozen model decodes in for `option` ("fp32", "bf16", "auto": training's measured,
    cached choice, see `choose`): torch.bfloat16, or None for the model as loaded (float32)."""
    return torch.bfloat16 if choose(option, device=device).bf16 else None


def _cast_parameters(params, dtype: torch.dtype) -> list:
    """Store each floating-point parameter of `params` in `dtype`; returns [(parameter, original tensor)].

    Only parameters: a rotary embedding's float32 inverse frequencies (a buffer) would lose position
    precision in bf16 (the model computes its cos/sin from them in float32, then casts to the activations').
    """
    originals = []
    for p in params:  # model.parameters() yields tied weights once
        if p.is_floating_point() and p.dtype != dtype:
            originals.append((p, p.data))
            p.data = p.data.to(dtype)
    return originals


@contextlib.contextmanager
def _parameters_in(params, dtype: torch.dtype):
    """Within the block `params` are stored in `dtype`; at exit the original tensors are put back (the very
    same storage: exact)."""
    originals = _cast_parameters(params, dtype)
    try:
        yield
    finally:
        for p, data in originals:
            p.data = data


def cast_model(model, dtype: torch.dtype | None):
    """`model`'s floating-point parameters stored in `dtype` for good (None: nothing changes); returns `model`.

    Weights and activations then run in `dtype` (its activations follow its weights), with no autocast:
    decoding keeps the path that starts from a cache holding the prefix (`attention.cached_prefix`)."""
    if dtype is not None:
        _cast_parameters(model.parameters(), dtype)
    return model


@contextlib.contextmanager
def model_in(model, dtype: torch.dtype | None):
    """Within the block, `model`'s floating-point parameters are stored in `dtype` (as `cast_model`); at exit
    the original tensors are put back (the very same storage: exact). `dtype=None`: nothing is changed.

    Artifacts applied inside the block (weight methods' `apply`) see the model in `dtype`."""
    with _parameters_in(model.parameters() if dtype is not None else (), dtype):
        yield model
