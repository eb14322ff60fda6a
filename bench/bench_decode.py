"""Decoding with a prefix vs the plain model: greedy, beam-5, and a mixed batch of 8 prefixes.

    python bench/bench_decode.py [--quick] [--reps 3] [--tokens 8] [--json out.json]

8 E2E sources as prompts (left-padded, one batch), exactly `tokens` new tokens each (EOS
suppressed with min_new_tokens, so every path does the same work), HF `generate`:

  plain          a separately loaded copy of the model with stock sdpa attention, no prefixtune at all
  plain again    a second such copy: plain / plain again (an A/A ratio) is the bench's repeatability, so
                 a prefix ratio is read against it (a 2% goal needs an A/A ratio within 1 +- 0.01)
  prefix         prefixtune's engine with one 10-token prefix shared by the batch
  mixed          prefixtune's engine, 8 different 10-token prefixes, one per row (generate_mixed)
  prefix per-step  the prefix added by prefixtune's attention functions at every layer and step (the
                 path before decoding started from a cache holding the prefix; still the path for
                 infixes, soft prompts, sliding windows, encoder-decoders and autocast)

each greedy and with beam search (5 beams; mixed: greedy only), interleaved, best of `reps`.
Goals: prefix <= 1.02x the plain model's time; mixed batch >= 0.95x a plain batch's throughput.
"""

from __future__ import annotations

import torch

import common
from common import pt

from prefixtune import engine
from prefixtune.batching import prompt_batch

PREFIX_TEXTS = ["table-to-text:", "Describe the restaurant:", "name : type : area :", "Write one sentence:",
                "E2E restaurant text", "Summarize the attributes:", "A short review:", "Restaurant facts:"]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=32)  # 8 timed mostly the prompt's forward, not decoding
    ap.set_defaults(reps=5)
    ap.add_argument("--prefix-length", type=int, default=10)
    args = ap.parse_args()
    env = common.setup(args)
    reps, tokens = (1, 4) if args.quick else (args.reps, args.tokens)
    model, tok = common.load(args.quick)
    plain = common.fresh_copy(model)
    plain_again = common.fresh_copy(model)
    with torch.no_grad():
        bank = [pt.PrefixModel(model, pt.PrefixConfig(length=args.prefix_length, init_text=t, reparam="flat"),
                               tokenizer=tok).merge() for t in PREFIX_TEXTS]
    shared = pt.RowPrefixes.per_row([bank[0]])
    ids, mask = prompt_batch(tok, [p.source for p in common.e2e_pairs(8)], False)
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def run(kind: str, beams: int):
        kw = dict(gen, num_beams=beams)

        def go() -> float:
            with common.Stopwatch() as sw, torch.inference_mode(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=env.bf16):
                if kind in ("plain", "plain again"):
                    out = (plain if kind == "plain" else plain_again).generate(input_ids=ids, attention_mask=mask, **kw)
                elif kind == "prefix":
                    out = pt.generate_with_prefix(model, shared, ids, mask, **kw)
                elif kind == "prefix per-step":
                    real, engine.cached_prefix = engine.cached_prefix, lambda *a: None
                    try:
                        out = pt.generate_with_prefix(model, shared, ids, mask, **kw)
                    finally:
                        engine.cached_prefix = real
                else:
                    out = pt.generate_mixed(model, bank, ids, mask, **kw)
            assert out.shape[1] == ids.shape[1] + tokens
            return sw.seconds
        return go

    systems = {"plain greedy": run("plain", 1), "plain again greedy": run("plain again", 1),
               "prefix greedy": run("prefix", 1), "prefix per-step greedy": run("prefix per-step", 1),
               "mixed greedy": run("mixed", 1),
               "plain beam-5": run("plain", 5), "prefix beam-5": run("prefix", 5)}
    for fn in systems.values():
        fn()  # warm-up
    load_start = common.machine()["load_average"]
    times = common.interleave(systems, reps)
    load_end = common.machine()["load_average"]
    results = {name: common.stats(ts) for name, ts in times.items()}
    print(f"decoding, 8 prompts, {tokens} new tokens, prefix length {args.prefix_length}, {env.precision}, "
          f"{env.threads} threads, best of {reps}; load average {load_start} -> {load_end}")
    for name, r in results.items():
        print(f"  {name:<22} {r['min']:7.3f} s (median {r['median']:.3f})  {8 * tokens / r['min']:7.1f} tok/s")

    def t(name):
        return results[name]["min"]

    ratios = [
        common.ratio("decode: plain / plain again, greedy (A/A: the bench's repeatability)",
                     t("plain greedy") / t("plain again greedy"), None,
                     f"median {results['plain greedy']['median'] / results['plain again greedy']['median']:.3f}"),
        common.ratio("decode: prefix / plain model time, greedy", t("prefix greedy") / t("plain greedy"), "<= 1.02",
                     f"median {results['prefix greedy']['median'] / results['plain greedy']['median']:.3f}"),
        common.ratio("decode: prefix / plain model time, beam-5", t("prefix beam-5") / t("plain beam-5"), "<= 1.02",
                     f"median {results['prefix beam-5']['median'] / results['plain beam-5']['median']:.3f}"),
        common.ratio("lever: prefix in the cache / added per layer and step, greedy",
                     t("prefix greedy") / t("prefix per-step greedy"), None,
                     f"median {results['prefix greedy']['median'] / results['prefix per-step greedy']['median']:.3f}"),
        common.ratio("decode: mixed 8 prefixes / plain batch (throughput)", t("plain greedy") / t("mixed greedy"),
                     ">= 0.95", f"median {results['plain greedy']['median'] / results['mixed greedy']['median']:.3f}"),
    ]
    common.write(args, {"part": "decode", "precision": env.reason, "reps": reps, "new_tokens": tokens,
                        "load_average_start_end": [load_start, load_end], "seconds": results, "ratios": ratios})


if __name__ == "__main__":
    main()
