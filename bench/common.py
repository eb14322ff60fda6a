"""Shared helpers of the benchmark scripts: model and data, interleaved timing, machine facts, JSON out.

Every script takes `--quick` (a tiny random Llama and a few steps: checks that the script runs, its
numbers mean nothing) and `--json PATH` (its results, merged by bench/run_all.py into
bench/results/DATE-HHMM-CPU.json, or -GPU.json on a GPU). A result is a dict {"figures": {...},
"ratios": [...]}: each ratio names its goal so that the table printed by run_all.py says at a glance
what is met. Scripts that can run on a GPU (`parser(doc, cuda=True)`) also take `--device`; the
others run on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a fresh clone without installing

import prefixtune as pt  # noqa: E402
from prefixtune.precision import available_cores, device_model  # noqa: E402

# the project's shared data beside the repository, or $PREFIXTUNE_DATA (the library's own variable)
DATA_DIR = Path(os.environ.get("PREFIXTUNE_DATA") or ROOT.parent / "shared" / "data")
MODEL = "smollm2-135m"


def parser(doc: str, cuda: bool = False) -> argparse.ArgumentParser:
    """The common options; `cuda`: the script can run on a GPU (`--device`), else it runs on the CPU."""
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, few steps: a smoke run (~seconds)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--precision", default="auto", help="auto (measured, cached; bf16 on a GPU), fp32 or bf16")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    if cuda:
        ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    else:
        ap.set_defaults(device="cpu")
    return ap


def resolve_device(option: str) -> str:
    """The device of `--device option`, "cpu" or "cuda", with the process pinned to it.

    HF Trainer takes every GPU it sees (DataParallel over several) and prefixtune's trainer any visible
    GPU, even in a CPU run: so only the GPU asked for stays visible (as cuda:0), and none for the CPU.
    CUDA reads $CUDA_VISIBLE_DEVICES once, at its first use: nothing here asks CUDA before it is set.
    """
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", option):
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N, got {option!r}")
    if option == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    index = int(option.partition(":")[2] or 0)
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in given.split(",") if v.strip()] if given is not None else [str(index)]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else ""
    if torch.cuda.is_available():
        return "cuda"
    if option == "auto":
        return "cpu"
    why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
           f"no GPU {index}" + (f" in $CUDA_VISIBLE_DEVICES={given!r}" if given is not None else ""))
    raise SystemExit(f"--device {option}: CUDA is not available here ({why}); use --device cpu")


def choose_precision(option: str, device: str, quick: bool):
    """The prefixtune.precision.Precision a run on `device` uses for `--precision option`."""
    from prefixtune.precision import choose

    if option == "auto" and device == "cuda":
        # the GPU comparison runs in bf16 (issue 20) where the GPU has it natively (Ampere and later):
        # precision.py's measurement answers a CPU's question (bf16 emulated or slower on some CPUs)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        p = choose("bf16" if native else "fp32", device=device)
        return type(p)(p.bf16, p.threads, f"{p.name}: the GPU comparison's precision where bf16 is native "
                                          f"({device_model(device)}: {'native' if native else 'not native'})")
    return choose("fp32" if quick and option == "auto" else option, device=device)


def setup(args) -> SimpleNamespace:
    """Device, precision and threads for the whole script (the same for every system compared).

    `args.device` is resolved in place ("cpu" or "cuda"), so that `write` records the device used.
    """
    from prefixtune.precision import apply

    args.device = resolve_device(args.device)
    p = choose_precision(args.precision, args.device, args.quick)
    if args.quick and args.device == "cpu":
        # the tiny model gains nothing from threads, and they suffer most on a shared machine
        p = type(p)(p.bf16, 1, p.reason)
    apply(p, args.device)
    gpu = device_model(args.device) if args.device == "cuda" else None
    print(f"device {args.device}{f' ({gpu})' if gpu else ''}\nprecision {p.reason}", flush=True)
    return SimpleNamespace(device=args.device, gpu=gpu, bf16=p.bf16, threads=p.threads, precision=p.name,
                           reason=p.reason)


# ---------------------------------------------------------------------------------------------
# Model and data


def tiny_model(device: str = "cpu"):
    """A tiny random Llama (grouped-query attention) and a word-level tokenizer: the --quick model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}
    words = "name type area food price near family friendly eatType customer rating the a is in of and".split()
    vocab.update({w: i + 5 for i, w in enumerate(words)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["\n"])
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return pt.models.freeze(model).to(device), tok


MODEL_DIR_ENV = "PREFIXTUNE_BENCH_MODEL_DIR"


def load(quick: bool, device: str = "cpu"):
    """(model, tokenizer) on `device`: SmolLM2-135M, or the tiny model with --quick.

    run_all.py converts the GGUF model once into a safetensors folder ($PREFIXTUNE_BENCH_MODEL_DIR):
    building the tokenizer from GGUF takes minutes on a busy 2-core machine, loading the folder seconds.
    Attention is sdpa (transformers' default; the tiny model and `fresh_copy` set it): on CUDA, PyTorch's
    sdpa picks its fused kernels by itself (flash attention, or memory-efficient attention where a padding
    mask is passed), so the GPU comparison needs no flash-attn package.
    """
    if quick:
        return tiny_model(device)
    folder = os.environ.get(MODEL_DIR_ENV)
    if folder:
        model, tok = pt.load_model(folder)
        model._prefixtune_name = MODEL
    else:
        model, tok = pt.load_model(MODEL)
    return model.to(device), tok


def save_model_folder(folder: str) -> None:
    """Convert the benchmark model once to a folder that `load` reads fast."""
    model, tok = pt.load_model(MODEL)
    # the weights are already de-quantized to float32: drop the GGUF marker that forbids saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def fresh_copy(model):
    """A second, independent copy (own weights, stock attention): for the plain model and for PEFT."""
    other = copy.deepcopy(model)
    other.set_attn_implementation("sdpa")
    return other


def e2e_pairs(n: int, seed: int = 0):
    """n (source, target) pairs from E2E dev (../shared/data), a fixed random sample."""
    import random

    from prefixtune.data import load_dataset

    if not DATA_DIR.exists():
        raise SystemExit(f"E2E data not found at {DATA_DIR} (the shared data beside the repository; or set $PREFIXTUNE_DATA)")
    examples = load_dataset("e2e", "dev", data_dir=str(DATA_DIR)).examples
    return random.Random(seed).sample(examples, n)


# ---------------------------------------------------------------------------------------------
# Timing


def interleave(systems: dict, reps: int) -> dict[str, list]:
    """Run each system once per repetition, in turn (rotating the order), so load hits all alike.

    systems: name -> callable returning a measurement (a number, or a dict with "seconds").
    """
    names = list(systems)
    out: dict[str, list] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out[name].append(systems[name]())
    return out


def stats(xs: list[float]) -> dict:
    return {"min": min(xs), "max": max(xs), "median": statistics.median(xs), "all": [round(x, 4) for x in xs]}


def sync(device: str) -> None:
    """Wait for the work queued on `device`: CUDA kernels run asynchronously, so a clock read without
    this times their launch, not their work. A no-op on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def now(device: str = "cpu") -> float:
    """The clock, once the work queued on `device` is done: every timing here reads it."""
    sync(device)
    return time.perf_counter()


def timed(fn, *args, device: str = "cpu", **kwargs) -> float:
    t0 = now(device)
    fn(*args, **kwargs)
    return now(device) - t0


def matmul_peak(bf16: bool, device: str = "cpu", reps: int = 5) -> float:
    """Measured FLOP/s of one n x n x n matmul (best of reps) on `device`, at the current thread count: the peak.

    n = 1024 on the CPU; 8192 on a GPU, where a 1024 matmul takes microseconds and would time its launch.
    """
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    best = min(timed(torch.mm, a, b, device=device) for _ in range(reps))
    return 2 * n ** 3 / best


def peak_rss_reset() -> None:
    """Forget the peak RSS so far (Linux: VmHWM), so the next reading covers what follows only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# Results


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "prefixtune": pt.__version__}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str | None:
    """The checkout's short commit, recorded with a result (None outside a git checkout)."""
    import subprocess  # only the records that name their commit need it

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: str = "cpu") -> dict:
    """Date, CPU, cores, versions, load average; the device, and its model on a GPU."""
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cpu": device_model("cpu"), "cores": available_cores(), "versions": versions(),
           "load_average": [round(x, 2) for x in os.getloadavg()], "device": device}
    if device.startswith("cuda"):
        out["gpu"] = device_model(device)
    return out


def ratio(name: str, value: float, goal: str | None = None, note: str = "") -> dict:
    """One line of the ratio table; `goal` like '>= 1.5' or '<= 1.02' (None: informative only)."""
    met = None
    if goal:
        op, bound = goal.split()
        met = value >= float(bound) if op == ">=" else value <= float(bound)
    return {"name": name, "value": round(value, 3), "goal": goal, "met": met, "note": note}


def write(args, result: dict) -> None:
    """Print this script's ratios and write its JSON (atomically) when --json was given."""
    from prefixtune.files import atomic_write_bytes

    result = {"machine": machine(args.device), "quick": bool(args.quick), **result}
    print_ratios(result.get("ratios", []))
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())


def print_ratios(rows: list[dict]) -> None:
    for r in rows:
        goal = f"goal {r['goal']}" if r.get("goal") else ""
        mark = {True: "met", False: "NOT met", None: ""}[r.get("met")]
        print(f"  {r['name']:<52} {r['value']:>8.3f}  {goal:<12} {mark:<8} {r.get('note', '')}")


class Stopwatch:
    """with Stopwatch(device) as sw: ...; sw.seconds (the work queued on `device` included)"""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def __enter__(self):
        self.start = now(self.device)
        return self

    def __exit__(self, *exc):
        self.seconds = now(self.device) - self.start
