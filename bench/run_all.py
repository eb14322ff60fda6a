"""`make bench`: every benchmark, one after another, then one table of ratios and one JSON file.

    python bench/run_all.py [--quick] [--device auto] [--out PATH]

Runs bench_train, bench_memory, bench_scaling, bench_levers, bench_profile, bench_decode,
bench_serve_scale and bench_serve, each in its own process (so one's memory and threads never affect another), and writes
bench/results/DATE-HHMM-CPU.json: date, CPU model, versions, the precision chosen, the machine's load
average at start and end, and every script's figures. --quick runs the tiny random model with a
few steps (about 2 minutes): it checks that the suite runs, and writes to --out (default: a
temporary file), never to bench/results.

On a GPU (--device: cuda where one is available) bench_train and bench_decode run there (bf16 by
default) and the CPU-only scripts are skipped, each with its reason (CPU_ONLY); the file is then
bench/results/DATE-HHMM-GPU.json, named by the GPU's model, and records the device and the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

# the goals' figures first: a run cut short keeps them
SCRIPTS = ["bench_train.py", "bench_memory.py", "bench_decode.py", "bench_serve_scale.py", "bench_scaling.py",
           "bench_levers.py", "bench_profile.py", "bench_serve.py"]
# bench_serve.py's own defaults (2 rounds of 32 tokens) double its time for the same ratios
# and bench_levers.py's step in the slower precision repeats what precision.py measured (13x slower here)
# and its 1-thread step what precision.py measured too; scaling's ratios need one repetition (the suite
# took 20.8 min on a 2-core EPYC without AVX-512 with both at 2; about 19 min without them)
EXTRA_ARGS = {"bench_serve.py": ["--rounds", "1", "--tokens", "16"],
              "bench_levers.py": ["--skip-other-precision", "--skip-threads", "--reps", "2"],
              "bench_scaling.py": ["--reps", "1"]}
# scripts that measure the CPU itself, or whose model, autocast and timers are the CPU's: skipped on a GPU
# (the others take --device)
CPU_ONLY = {"bench_memory.py": "peak RSS is the host's memory; a GPU run's activations are in GPU memory",
            "bench_serve_scale.py": "its model, serving engine and autocast run on the CPU",
            "bench_scaling.py": "its steps run under CPU autocast, timed without synchronizing a GPU",
            "bench_levers.py": "its levers are the CPU's (threads, CPU autocast, compile on the CPU)",
            "bench_profile.py": "it groups self CPU time by operator (torch.profiler's CPU activity)",
            "bench_serve.py": "its model and serving engine run on the CPU at --threads"}


def serve_ratios(report: dict) -> list[dict]:
    """bench_serve.py predates common.py: turn its ratios into table rows."""
    r = report["ratios"]
    return [common.ratio("serve: mixed batch / PEFT grouped by prefix", r["mixed_vs_peft"], ">= 3.0",
                         report.get("peft_equal_to_mixed", "")),
            common.ratio("serve: mixed batch / same-prefix batch", r["mixed_vs_same"], ">= 0.9"),
            common.ratio("serve: mixed batch / our engine one group at a time", r["mixed_vs_grouped"], None),
            common.ratio("serve: mixed batch / no prefix (throughput)", r["mixed_vs_plain"], ">= 0.98"),
            common.ratio("serve: prefix in the cache / per step (lever)", r["mixed_vs_per_step"], None),
            common.ratio("serve: reserved cache / transformers' growing cache (lever)",
                         r["mixed_vs_stock_cache"], None)]


def command(script: str, out: Path, quick: bool, device: str) -> list[str]:
    """The command line that runs `script`, writing its JSON to `out` (CPU_ONLY scripts take no --device)."""
    cmd = [sys.executable, str(HERE / script), "--json", str(out)] + (["--quick"] if quick else [])
    cmd += [] if script in CPU_ONLY else ["--device", device]
    return cmd + (EXTRA_ARGS.get(script, []) if not quick else [])


def results_path(start: dict) -> Path:
    """bench/results/DATE-HHMM-MODEL.json, MODEL the GPU's on a GPU, else the CPU's."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", start.get("gpu") or start["cpu"]).strip("-")
    # the start time in the name: a second run on the same day and machine keeps the first one's record
    return HERE / "results" / f"{start['date'][:10]}-{start['date'][11:16].replace(':', '')}-{slug}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--out", help="results file (default: bench/results/DATE-HHMM-CPU.json, -GPU.json on a GPU; "
                    "--quick: a temporary file)")
    ap.add_argument("--only", nargs="*", help="run only these scripts (e.g. bench_decode.py)")
    args = ap.parse_args()
    started = time.time()
    # pins this process to the device: the scripts inherit $CUDA_VISIBLE_DEVICES, so "cuda" is the same GPU there
    device = common.resolve_device(args.device)
    start = common.machine(device)
    # on the CPU measured once per machine (then cached), before any script runs
    precision = common.choose_precision("auto", device, args.quick)
    gpu = f" ({start['gpu']})" if device == "cuda" else ""
    print(f"prefixtune benchmarks{' (quick smoke run)' if args.quick else ''}, {start['date']}, {start['cpu']} "
          f"x{start['cores']}, load average {start['load_average']}\ndevice {device}{gpu}\n"
          f"precision {precision.reason}", flush=True)

    if args.out:
        path = Path(args.out)
    elif args.quick:
        path = Path(tempfile.gettempdir()) / "prefixtune-bench-quick.json"
    else:
        path = results_path(start)
    result = {"date": start["date"], "cpu": start["cpu"], "cores": start["cores"], "versions": start["versions"],
              "device": device, **({"gpu": start["gpu"]} if device == "cuda" else {}),
              "precision": precision.reason, "load_average_start": start["load_average"], "quick": args.quick,
              "complete": False, "ratios": [], "parts": {}, "skipped": {}}
    parts = result["parts"]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.quick:  # convert the GGUF model once; every script then loads the folder in seconds
            t0 = time.time()
            try:
                common.save_model_folder(str(Path(tmp) / "model"))
                os.environ[common.MODEL_DIR_ENV] = str(Path(tmp) / "model")
                print(f"model converted once for all scripts in {time.time() - t0:.0f} s", flush=True)
            except Exception as e:  # slower, not wrong: every script loads the GGUF model itself
                print(f"could not convert the model once ({e}); each script loads it", flush=True)
        for script in args.only or SCRIPTS:
            if device == "cuda" and script in CPU_ONLY:
                print(f"\n== {script} == skipped on the GPU: {CPU_ONLY[script]}", flush=True)
                result["skipped"][script.removesuffix(".py")] = CPU_ONLY[script]
                continue
            out = Path(tmp) / (script + ".json")
            print(f"\n== {script} ==", flush=True)
            t0 = time.time()
            proc = subprocess.run(command(script, out, args.quick, device))
            if proc.returncode:
                raise SystemExit(f"{script} failed (exit {proc.returncode})")
            name = script.removesuffix(".py")
            parts[name] = json.loads(out.read_text())
            parts[name]["wall_s"] = round(time.time() - t0, 1)
            result["ratios"] += serve_ratios(parts[name]) if name == "bench_serve" else parts[name].get("ratios", [])
            save(path, result)  # after every part: an interrupted run keeps what it measured
    end = common.machine()
    result.update(load_average_end=end["load_average"], wall_s=round(time.time() - started, 1), complete=True)
    print(f"\n== ratios ({start['date']}, {start.get('gpu') or start['cpu']}, {precision.name}, load average "
          f"{start['load_average'][0]} at start, {end['load_average'][0]} at end) ==")
    common.print_ratios(result["ratios"])
    save(path, result)
    print(f"\nwrote {path} ({result['wall_s'] / 60:.1f} min)")


def save(path: Path, result: dict) -> None:
    from prefixtune.files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
