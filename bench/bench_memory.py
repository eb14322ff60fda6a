"""Peak RSS while training: prefixtune vs PEFT + HF Trainer vs full fine-tuning, each in its own process.

    python bench/bench_memory.py [--quick] [--pairs 20] [--json out.json]

Each system runs in a fresh Python process: load the model, forget the peak so far (Linux VmHWM,
reset through /proc/self/clear_refs), train one epoch over the same E2E pairs (bench_train.py's
systems and settings), then read the peak. So the figure is the peak resident memory *while
training*, model weights included, without the model-loading spike. Goal: prefixtune <= PEFT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import common

SYSTEMS = ("prefixtune", "peft+grouped", "full-ft")


def child(system: str, args) -> None:
    import bench_train as bt

    env = common.setup(args)
    model, tok = common.load(args.quick)
    pairs = common.e2e_pairs(args.pairs)
    batch = 4 if args.quick else bt.BATCH
    if system.startswith("peft"):
        peft_model = bt.make_peft(model)
        common.peak_rss_reset()
        bt.run_peft(peft_model, tok, pairs, env, True, batch)
    else:
        common.peak_rss_reset()
        if system == "prefixtune":
            bt.run_prefixtune(model, tok, pairs, env, None, batch)
        else:
            bt.run_full(model, tok, pairs, env, batch)
    print("RESULT " + json.dumps({"system": system, "peak_rss_mb": common.peak_rss_mb()}))


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--child", choices=SYSTEMS, help="(internal) run one system in this process")
    args = ap.parse_args()
    if args.quick:
        args.pairs = 8
    if args.child:
        return child(args.child, args)
    peaks = {}
    for system in SYSTEMS[:2] if args.quick else SYSTEMS:  # quick: full-ft already runs in bench_train --quick
        cmd = [sys.executable, __file__, "--child", system, "--pairs", str(args.pairs), "--precision", args.precision]
        out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"bench_memory child {system!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        peaks[system] = json.loads(line[len("RESULT "):])["peak_rss_mb"]
        print(f"  {system:<14} peak RSS while training {peaks[system]:8.0f} MiB", flush=True)
    ratios = [common.ratio("memory: prefixtune / PEFT peak RSS while training",
                           peaks["prefixtune"] / peaks["peft+grouped"], "<= 1.0",
                           f"{peaks['prefixtune']:.0f} vs {peaks['peft+grouped']:.0f} MiB"),
              ] + ([] if "full-ft" not in peaks else [
              common.ratio("memory: prefixtune / full fine-tuning peak RSS", peaks["prefixtune"] / peaks["full-ft"], None,
                           f"full-ft {peaks['full-ft']:.0f} MiB")])
    common.write(args, {"part": "memory", "pairs": args.pairs, "peak_rss_mb": peaks, "ratios": ratios})


if __name__ == "__main__":
    main()
