"""Serving throughput with 1, 8, 64 and 256 distinct prefixes in the running batch.

    python bench/bench_serve_scale.py [--quick] [--requests 256] [--tokens 4] [--reps 1] [--json out.json]

`requests` requests (short prompts) are submitted at once to the continuous-batching engine
(`Batcher`, max batch = requests), greedy, exactly `tokens` new tokens each. Request i uses prefix
i % k for k = 1, 8, 64, 256 distinct prefixes (length 10; 8 made from text, the others those plus
small noise, so all are distinct). k = 1 is the same-prefix batch. Interleaved, best of `reps`.
Goal: 256 distinct prefixes >= 0.9x the same-prefix batch's throughput.
"""

from __future__ import annotations

import sys

import torch

import common
from common import pt

from prefixtune.prefix import MergedPrefix
from prefixtune.serve.batcher import Batcher, GenerationRequest
from prefixtune.serve.config import ServeConfig
from prefixtune.serve.sampling import SamplingParams

TEXTS = ["table-to-text:", "Translate to French:", "Summarize:", "Answer briefly:", "Reply kindly:",
         "Classify the sentiment:", "Continue the story:", "Explain simply:"]
PROMPTS = ["The cat sat on the mat", "Water boils at", "Dear Sir or Madam,", "Why is the sky blue?",
           "The train to Berlin leaves at", "Coffee contains", "My favourite book is", "Paris is a city in"]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()
    args.reps = min(args.reps, 1 if "--reps" not in sys.argv else args.reps)  # 256-row batches are slow on 2 cores
    env = common.setup(args)
    requests, tokens, reps = (16, 4, 1) if args.quick else (args.requests, args.tokens, args.reps)
    distinct = sorted({k for k in (1, 8, 64, 256) if k <= requests} | {requests})
    model, tok = common.load(args.quick)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = [pt.PrefixModel(model, pt.PrefixConfig(length=10, init_text=t, reparam="flat"), tokenizer=tok).merge()
                for t in TEXTS]
        bank = [base[i] if i < len(base) else
                MergedPrefix({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base[i % len(base)].kv.items()})
                for i in range(max(distinct))]
    prompt_ids = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(requests)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    config = ServeConfig(max_batch_size=requests, max_queue=requests, batch_window_ms=50, torch_threads=env.threads)

    def run(k: int):
        def go() -> float:
            with Batcher(model, tok, config) as batcher, \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=env.bf16):
                handles = batcher.submit_all([GenerationRequest(ids, bank[i % k], params)
                                              for i, ids in enumerate(prompt_ids)])
                start = min(h.submitted_at for h in handles)
                done = [h.result() for h in handles]
                seconds = max(h.finished_at for h in handles) - start
            return sum(c.completion_tokens for c in done) / seconds
        return go

    systems = {f"{k} distinct": run(k) for k in distinct}
    if not args.quick:  # warm-up on a few rows (kernels, allocator)
        with Batcher(model, tok, config) as batcher:
            [h.result() for h in batcher.submit_all([GenerationRequest(ids, bank[i], params)
                                                     for i, ids in enumerate(prompt_ids[:8])])]
    load_start = common.machine()["load_average"]
    tput = common.interleave(systems, reps)
    load_end = common.machine()["load_average"]
    results = {name: common.stats(xs) for name, xs in tput.items()}
    print(f"serving, {requests} requests x {tokens} new tokens, k distinct prefixes, {env.precision}, "
          f"{env.threads} threads, best of {reps}; load average {load_start} -> {load_end}")
    for name, r in results.items():
        print(f"  {name:<12} {r['max']:8.1f} tok/s (median {r['median']:.1f})")
    widest = f"{distinct[-1]} distinct"
    ratios = [common.ratio(f"serve: {name} / same-prefix batch (throughput)",
                           results[name]["max"] / results["1 distinct"]["max"], ">= 0.9" if name == widest else None)
              for name in results if name != "1 distinct"]
    common.write(args, {"part": "serve_scale", "precision": env.reason, "requests": requests, "new_tokens": tokens,
                        "reps": reps, "load_average_start_end": [load_start, load_end], "tokens_per_s": results,
                        "ratios": ratios})


if __name__ == "__main__":
    main()
