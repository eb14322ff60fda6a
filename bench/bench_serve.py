"""Serving benchmark (issue #4): many prefixes in one batch vs PEFT group-by-prefix, SmolLM2-135M, CPU.

    python bench/bench_serve.py [--requests 32] [--prefixes 8] [--tokens 32] [--rounds 2] [--paths ...] [--json out.json]

Workload: 32 requests over 8 prefixes (request i uses prefix i % 8), greedy, exactly 32 new tokens
each (EOS ignored so every path does the same work). Measured side by side in one run:

  mixed      our continuous-batching engine, all 32 requests submitted at once (one mixed batch)
  same       the same engine and prompts, every request using prefix 0 (a same-prefix batch)
  grouped    our engine run one prefix group at a time (isolates the gain of mixing from PEFT's overheads)
  plain      the same engine and prompts with no prefix at all: what serving with prefixes costs
  per-step   mixed, with prefill not writing the prefixes into the cache (the attention functions add
             each row's prefix per layer and step, the path before the cache held them): the lever row
  stock-cache  mixed, decoding from transformers' growing DynamicLayer (a copy of the cache per step)
             instead of prefixtune's ReservedLayer (kv_cache.py): the reserved cache's lever row
  peft       PEFT 0.21.2 prefix-tuning, requests grouped by prefix, group after group: PEFT's forward
             builds the prefix cache (its own past_key_values) and prefills; decode steps continue that
             cache through the base model, which is what PEFT's generate does. (PEFT's generate itself
             ignores the prefix on transformers 5.24, so it cannot be timed honestly.)

Goals: mixed >= 3x peft throughput; mixed >= 0.9x same; mixed >= 0.98x plain (issue 20). Each ratio is
given best round against best round, and as the median of the per-round ratios (`--paths
mixed,plain,per-step --rounds 5` resolves a few percent in a few minutes). Outputs of peft and mixed are compared
token by token so the comparison is honest. Every path runs in a worker thread with the same torch
thread count. Throughput = generated tokens / wall time; latency = submit-all to a request's end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

import warnings

import torch

import common  # noqa: F401  (puts this checkout's src/ first on the path)
import prefixtune as pt
import prefixtune.serve.batcher as batcher_module
from prefixtune.peft_io import to_peft_model
from prefixtune.serve.batcher import Batcher, GenerationRequest
from prefixtune.serve.config import ServeConfig, available_cores
from prefixtune.serve.sampling import SamplingParams

PREFIX_TEXTS = ["Translate English to French:", "Summarize the following article:", "table-to-text:",
                "Answer the question briefly:", "Write a friendly reply:", "Classify the sentiment:",
                "Continue the story:", "Explain like I am five:"]
PROMPTS = [
    "The cat sat on the mat", "name : The Eagle | type : coffee shop | area : riverside", "What is the capital of Peru?",
    "Once upon a time", "I loved this movie, it was", "The stock market fell sharply today after",
    "Water boils at", "Dear Sir or Madam,", "The quick brown fox jumps over the lazy dog", "Photosynthesis is",
    "name : Alimentum | area : city centre | family friendly : no", "Why is the sky blue?", "In 1969, astronauts",
    "The recipe needs two eggs and", "My favourite book is", "The weather tomorrow will be",
    "Paris is a city in", "The meeting has been moved to", "A good password should", "The train to Berlin leaves at",
    "Machine learning models can", "She opened the door and saw", "The museum is open from", "To install the package,",
    "Our team won the match because", "The doctor said that", "Coffee contains", "The library closes at",
    "Rain is expected in", "The best way to learn a language is", "He plays the guitar and", "The river flows into",
]


def in_thread(fn, *args):
    """Run fn in a fresh thread (as the server's worker does) and return its result."""
    out = {}

    def target():
        torch.set_num_threads(THREADS)
        with torch.inference_mode():
            out["value"] = fn(*args)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return out["value"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(name: str, seconds: float, tokens: int, latencies: list[float]) -> dict:
    return {"path": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "p50_latency_s": statistics.median(latencies), "p95_latency_s": percentile(latencies, 0.95)}


def run_ours(model, tok, prefixes, prompt_ids, tokens: int) -> tuple[dict, list[list[int]]]:
    # a work budget that fits every request at once: the benchmark measures one full batch
    longest = max(len(ids) for ids in prompt_ids) + tokens + max((p.length for p in prefixes if p is not None), default=0)
    config = ServeConfig(max_batch_size=len(prompt_ids), max_queue=len(prompt_ids), batch_window_ms=50,
                         torch_threads=THREADS, max_batch_tokens=max(16384, 2 * len(prompt_ids) * longest),
                         max_prompt_tokens=max(4096, longest))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    with Batcher(model, tok, config) as batcher:
        start = time.monotonic()
        handles = batcher.submit_all([GenerationRequest(ids, p, params) for ids, p in zip(prompt_ids, prefixes)])
        results = [h.result() for h in handles]
        seconds = max(h.finished_at for h in handles) - start
        latencies = [h.finished_at - start for h in handles]
    generated = sum(r.completion_tokens for r in results)
    return summary("", seconds, generated, latencies), [r.token_ids for r in results]


def run_ours_per_step(model, tok, prefixes, prompt_ids, tokens: int) -> tuple[dict, list[list[int]]]:
    """Our engine with the prefixes kept out of the cache: added per layer and decode step."""
    laid_out = batcher_module.cached_prefix
    batcher_module.cached_prefix = lambda *a, **k: None
    try:
        return run_ours(model, tok, prefixes, prompt_ids, tokens)
    finally:
        batcher_module.cached_prefix = laid_out


def run_ours_stock_cache(model, tok, prefixes, prompt_ids, tokens: int) -> tuple[dict, list[list[int]]]:
    """Our engine decoding from transformers' growing DynamicLayer (a copy of the cache per step) instead of
    prefixtune's ReservedLayer (kv_cache.py)."""
    reserve = batcher_module.reserve_layers
    batcher_module.reserve_layers = lambda cache, room: cache
    try:
        return run_ours(model, tok, prefixes, prompt_ids, tokens)
    finally:
        batcher_module.reserve_layers = reserve


def run_ours_grouped(model, tok, prefixes, prompt_ids, tokens: int) -> tuple[dict, list[list[int]]]:
    """Our engine, but one prefix group at a time (what serving without mixed batches would do)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        groups.setdefault(id(p), []).append(i)
    outputs: list = [None] * len(prompt_ids)
    latencies = [0.0] * len(prompt_ids)
    start = time.monotonic()
    for members in groups.values():
        _, got = run_ours(model, tok, [prefixes[i] for i in members], [prompt_ids[i] for i in members], tokens)
        done = time.monotonic() - start
        for i, g in zip(members, got):
            outputs[i], latencies[i] = g, done
    return summary("", time.monotonic() - start, tokens * len(prompt_ids), latencies), outputs


def peft_group(peft_model, prompt_ids: list[list[int]], tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy decode of one same-prefix group with PEFT's prefix cache."""
    n_virtual = peft_model.active_peft_config.num_virtual_tokens
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in prompt_ids])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in prompt_ids])
    full_mask = torch.cat([torch.ones(len(prompt_ids), n_virtual, dtype=mask.dtype), mask], dim=1)
    # left-padding-aware positions; PEFT's forward adds num_virtual_tokens to them (and its prefix to the mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    next_tok = out.logits[:, -1].argmax(-1)
    generated = [next_tok]
    for _ in range(tokens - 1):
        full_mask = torch.cat([full_mask, full_mask.new_ones(len(prompt_ids), 1)], dim=1)
        positions = full_mask.sum(-1, keepdim=True) - 1  # the base model sees the prefix as cached tokens
        out = peft_model.base_model(input_ids=next_tok[:, None], attention_mask=full_mask, position_ids=positions,
                                    cache=cache, use_cache=True)
        cache = out.cache
        next_tok = out.logits[:, -1].argmax(-1)
        generated.append(next_tok)
    return torch.stack(generated, dim=1).tolist()


def run_peft(peft_model, prefixes, prompt_ids, tokens: int, pad_id: int) -> tuple[dict, list[list[int]]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        groups.setdefault(id(p), []).append(i)
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    outputs: list = [None] * len(prompt_ids)
    latencies = [0.0] * len(prompt_ids)
    start = time.monotonic()
    for members in groups.values():
        kv = prefixes[members[0]].kv["self"]                       # (layers, 2, heads, length, head_dim)
        embedding.copy_(kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1))  # PEFT's row layout
        got = peft_group(peft_model, [prompt_ids[i] for i in members], tokens, pad_id)
        done = time.monotonic() - start
        for i, g in zip(members, got):
            outputs[i], latencies[i] = g, done
    seconds = time.monotonic() - start
    return summary("", seconds, tokens * len(prompt_ids), latencies), outputs


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="repeat all paths, interleaved; the best round of each is kept")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="paths to run, comma-separated (mixed always runs: every ratio is against it); e.g. "
                         "mixed,plain,per-step with more --rounds to resolve a few percent")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 4 requests: a smoke run (bench/common.py)")
    args = ap.parse_args()
    paths = ["mixed"] + [p for p in args.paths.split(",") if p != "mixed"]
    if unknown := [p for p in paths if p not in PATHS]:
        sys.exit(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    if args.quick:
        args.requests, args.prefixes, args.tokens, args.rounds, args.threads = 4, 2, 4, 1, 1
    THREADS = args.threads
    torch.set_num_threads(THREADS)

    t0 = time.monotonic()
    if args.quick:
        model, tok = common.tiny_model()
    elif args.model == common.MODEL:
        model, tok = common.load(False)  # run_all.py's converted folder when there is one
    else:
        model, tok = pt.load_model(args.model)
    load_s = time.monotonic() - t0
    with torch.no_grad():
        bank = [pt.PrefixModel(model, pt.PrefixConfig(length=args.prefix_length, init_text=text, reparam="flat"),
                               tokenizer=tok).merge() for text in PREFIX_TEXTS[: args.prefixes]]
    if args.prefixes > len(bank):
        sys.exit(f"at most {len(PREFIX_TEXTS)} prefixes")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    mixed_prefixes = [bank[i % len(bank)] for i in range(args.requests)]
    same_prefixes = [bank[0]] * args.requests
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # warm up every path once (allocator, kernels), untimed
    in_thread(run_ours, model, tok, mixed_prefixes[:4], prompt_ids[:4], 4)
    peft_model = to_peft_model(bank[0], model)
    peft_model.eval()
    in_thread(run_peft, peft_model, mixed_prefixes[:4], prompt_ids[:4], 4, pad_id)

    best: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    rounds: dict[str, list[float]] = {name: [] for name in paths}  # tokens/s of every round
    systems = {
        "mixed": (run_ours, (model, tok, mixed_prefixes, prompt_ids, args.tokens)),
        "peft": (run_peft, (peft_model, mixed_prefixes, prompt_ids, args.tokens, pad_id)),
        "same": (run_ours, (model, tok, same_prefixes, prompt_ids, args.tokens)),
        "grouped": (run_ours_grouped, (model, tok, mixed_prefixes, prompt_ids, args.tokens)),
        "plain": (run_ours, (model, tok, [None] * args.requests, prompt_ids, args.tokens)),
        "per-step": (run_ours_per_step, (model, tok, mixed_prefixes, prompt_ids, args.tokens)),
        "stock-cache": (run_ours_stock_cache, (model, tok, mixed_prefixes, prompt_ids, args.tokens)),
    }
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name in paths:
            fn, fn_args = systems[name]
            result, out = in_thread(fn, *fn_args)
            result["path"] = name
            outputs[name] = out
            rounds[name].append(result["tokens_per_s"])
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result
    load_after = os.getloadavg()

    if "peft" in outputs:
        equal = sum(a == b for a, b in zip(outputs["mixed"], outputs["peft"]))
        first_diff = [min((t for t, (x, y) in enumerate(zip(a, b)) if x != y), default=None)
                      for a, b in zip(outputs["mixed"], outputs["peft"])]
    # each ratio: mixed's best round against the other path's best round; and the median of the per-round ratios
    ratios = {f"mixed_vs_{name.replace('-', '_')}": best["mixed"]["tokens_per_s"] / best[name]["tokens_per_s"]
              for name in paths[1:]}
    median_ratios = {f"mixed_vs_{name.replace('-', '_')}": statistics.median(
        m / o for m, o in zip(rounds["mixed"], rounds[name])) for name in paths[1:]}
    for lever in ("per-step", "stock-cache"):
        if lever in outputs and outputs[lever] != outputs["mixed"]:
            sys.exit(f"the {lever} path and the mixed path gave different tokens: a bug, not a speed difference")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": "tiny random llama (--quick)" if args.quick else args.model, "requests": args.requests, "prefixes": args.prefixes, "new_tokens": args.tokens,
        "prefix_length": args.prefix_length, "rounds": args.rounds, "torch_threads": THREADS,
        "cpu": platform.processor() or platform.machine(), "cores": available_cores(), "torch": torch.__version__,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "model_load_s": round(load_s, 1), "results": list(best.values()), "ratios": ratios,
        "median_ratios": median_ratios, "tokens_per_s_per_round": rounds,
    }
    if "peft" in outputs:
        report |= {"peft_equal_to_mixed": f"{equal}/{args.requests} requests token-for-token",
                   "peft_first_difference_at": first_diff}

    print(f"prefixtune serving benchmark, {report['date']}")
    print(f"{args.model}, {args.requests} requests over {args.prefixes} prefixes (length {args.prefix_length}), "
          f"{args.tokens} new tokens each, greedy, {THREADS} torch threads on {report['cores']} cores, "
          f"best of {args.rounds} rounds; load average {report['load_average_before_after']}")
    print(f"{'path':<8} {'tokens/s':>9} {'wall s':>8} {'p50 s':>7} {'p95 s':>7}")
    for r in best.values():
        print(f"{r['path']:<8} {r['tokens_per_s']:9.1f} {r['seconds']:8.2f} {r['p50_latency_s']:7.2f} {r['p95_latency_s']:7.2f}")
    for name in paths[1:]:
        key = f"mixed_vs_{name.replace('-', '_')}"
        print(f"mixed / {name} ({LABELS[name]}): {ratios[key]:.3f}x best, {median_ratios[key]:.3f}x median of rounds")
    if "peft" in outputs:
        print(f"PEFT output equals ours: {report['peft_equal_to_mixed']}")
        if equal == 0:
            print("WARNING: no PEFT output equals ours; the comparison is not of the same computation")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


THREADS = 1
# every path the benchmark can run, with what its ratio to mixed means (and its goal)
LABELS = {"mixed": "our engine, all prefixes in one batch",
          "peft": "PEFT grouped by prefix; goal >= 3.0",
          "same": "one same-prefix batch; goal >= 0.9",
          "grouped": "our engine, one prefix group at a time",
          "plain": "no prefix at all; goal >= 0.98",
          "per-step": "lever: prefixes added per layer and step instead of held in the cache",
          "stock-cache": "lever: transformers' growing cache instead of the reserved one"}
PATHS = list(LABELS)
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")

if __name__ == "__main__":
    main()
