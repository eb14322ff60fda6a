"""The continuous-batching engine: every row of a mixed batch equals that request run alone.

References come from `generate_mixed` (HF generate) on one request with its prefix, greedy.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import prefixtune as pt
from prefixtune.prefix import MergedPrefix
from prefixtune.serve.batcher import Batcher, GenerationRequest, PrefixRemoved, QueueFull, ShuttingDown, prefill_groups
from prefixtune.serve.config import ServeConfig
from prefixtune.serve.prefix_cache import LoadedPrefix
from prefixtune.serve.sampling import SamplingParams, TextTracker, decode
from prefixtune.serve.testing import char_tokenizer

from conftest import one_torch_thread_impl, tiny

PROMPTS = ["hello", "a much longer prompt, with commas", "xy", "The quick brown fox", "Z"]


def random_prefix(model, length: int, seed: int) -> MergedPrefix:
    g = torch.Generator().manual_seed(seed)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g)
          for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
    return MergedPrefix(kv=kv, meta={"method": "prefix"})


def alone(model, tok, prefix, prompt: str, max_tokens: int) -> list[int]:
    """The reference: this request by itself through HF generate, greedy, cut at EOS."""
    ids = tok(prompt)["input_ids"]
    out = pt.generate_mixed(model, [prefix], input_ids=torch.tensor([ids]), max_new_tokens=max_tokens,
                            do_sample=False)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


def config(**kw) -> ServeConfig:
    return ServeConfig(torch_threads=1, **kw)


one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny("llama"), char_tokenizer()
    prefixes = [random_prefix(model, n, seed=n) for n in (2, 5, 3)] + [None]
    return model, tok, prefixes


def test_mixed_batch_with_joins_equals_each_request_alone(setup):
    """Requests join mid-decode (submitted from inside a running row's stream) and leave when done."""
    model, tok, prefixes = setup
    cases = [(prefixes[i % 4], PROMPTS[(3 * i) % 5], 4 + 2 * i) for i in range(10)]
    joined = threading.Event()
    later: list = []
    pieces = 0

    with Batcher(model, tok, config(max_batch_size=6, batch_window_ms=0)) as batcher:
        def on_text(piece):  # runs on the worker thread, between decode steps
            nonlocal pieces
            pieces += 1
            if pieces == 3:
                later.extend(batcher.submit_all([GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=n))
                                                 for pre, p, n in cases[2:]]))
                joined.set()

        first_long = (prefixes[1], "a much longer prompt, with commas", 30)
        first = batcher.submit_all([GenerationRequest(tok(first_long[1])["input_ids"], first_long[0],
                                                      SamplingParams(max_tokens=first_long[2]), on_text=on_text)] +
                                   [GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=n))
                                    for pre, p, n in cases[:2]])
        results = [h.result(30) for h in first]
        assert joined.wait(5)
        results += [h.result(30) for h in later]
        assert batcher.largest_batch > 3  # the late requests really shared steps with the running ones
    for (pre, prompt, n), got in zip([first_long] + cases, results):
        ref = alone(model, tok, pre, prompt, n)
        assert got.token_ids == ref, (prompt, n)
        assert got.text == decode(tok, ref)
        assert got.finish_reason == ("length" if len(ref) == n else "stop")
        assert got.prompt_tokens == len(tok(prompt)["input_ids"])
    # different prefixes gave different answers: the test is not vacuous
    assert len({tuple(r.token_ids) for r in results[1:5]}) > 1


def test_prefill_batch_of_different_lengths_and_no_prefix_rows(setup):
    model, tok, prefixes = setup
    with Batcher(model, tok, config(max_batch_size=32, batch_window_ms=50)) as batcher:
        cases = [(p, prompt) for p in prefixes for prompt in PROMPTS]
        got = batcher.generate([GenerationRequest(tok(s)["input_ids"], p, SamplingParams(max_tokens=8))
                                for p, s in cases], timeout=30)
        assert batcher.largest_batch == len(cases)  # all arrived within the window: one prefill
    for (p, s), c in zip(cases, got):
        assert c.token_ids == alone(model, tok, p, s, 8)
    with Batcher(model, tok, config(batch_window_ms=50)) as batcher:  # no row has a prefix
        got = batcher.generate([GenerationRequest(tok(s)["input_ids"], None, SamplingParams(max_tokens=8)) for s in PROMPTS])
    assert [c.token_ids for c in got] == [alone(model, tok, None, s, 8) for s in PROMPTS]


def test_stop_strings_cut_the_text_and_streaming_holds_back(setup):
    model, tok, prefixes = setup
    with Batcher(model, tok, config(batch_window_ms=0)) as batcher:
        full = batcher.submit(GenerationRequest(tok("hello")["input_ids"], prefixes[0], SamplingParams(max_tokens=20))).result(10)
        assert len(full.text) >= 6
        stop = full.text[3:5]
        cut = full.text[:full.text.find(stop)]
        pieces = []
        got = batcher.submit(GenerationRequest(tok("hello")["input_ids"], prefixes[0],
                                               SamplingParams(max_tokens=20, stop=("@@@", stop)),
                                               on_text=pieces.append)).result(10)
    assert got.text == cut and got.finish_reason == "stop"
    assert "".join(pieces) == cut


def test_text_tracker_never_streams_part_of_a_stop_string():
    tok = char_tokenizer()
    tracker = TextTracker(tok, ("STOP",))
    ids, streamed = [], []
    for ch in "abcSTOxySTOPzz":
        ids.append(tok(ch)["input_ids"][0])
        if tracker.update(ids):
            break
        streamed.append(tracker.take(final=False))
    streamed.append(tracker.take(final=True))
    assert "".join(streamed) == tracker.text == "abcSTOxy"


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(setup):
    model, tok, prefixes = setup
    ids = tok("The quick")["input_ids"]
    with Batcher(model, tok, config()) as batcher:
        hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
        a, b, c = batcher.generate([GenerationRequest(ids, prefixes[2], hot), GenerationRequest(ids, prefixes[2], hot),
                                    GenerationRequest(ids, prefixes[2], SamplingParams(max_tokens=12, temperature=1.5,
                                                                                        top_p=1e-6, seed=3))])
    assert a.token_ids == b.token_ids
    assert c.token_ids == alone(model, tok, prefixes[2], "The quick", 12)
    assert a.token_ids != c.token_ids  # temperature 1.5 on a random model: surely not the greedy path


def test_queue_bound_revoked_prefix_and_shutdown(setup):
    model, tok, prefixes = setup
    batcher = Batcher(model, tok, config(max_batch_size=1, max_queue=2, batch_window_ms=0))
    with pytest.raises(ShuttingDown):  # not started yet
        batcher.submit(GenerationRequest([5, 6], None))
    batcher.start()
    long = SamplingParams(max_tokens=200)
    gone = LoadedPrefix(name="gone", prefix=prefixes[0])
    running = batcher.submit(GenerationRequest([5, 6], None, long))
    while batcher.running == 0:
        time.sleep(0.001)
    queued = batcher.submit_all([GenerationRequest([5, 6], gone, long), GenerationRequest([7], None, SamplingParams(3))])
    with pytest.raises(QueueFull):
        batcher.submit(GenerationRequest([5, 6], None))
    gone.revoked = True  # removed while waiting: refused when its turn comes
    running.cancel()
    with pytest.raises(PrefixRemoved):
        queued[0].result(10)
    assert queued[1].result(10).completion_tokens <= 3
    batcher.stop()
    with pytest.raises(ShuttingDown):
        batcher.submit(GenerationRequest([5, 6], None))


def test_requests_the_model_cannot_take_are_refused(setup):
    model, tok, _ = setup
    with Batcher(model, tok, config()) as batcher:
        with pytest.raises(ValueError, match="no tokens"):
            batcher.submit(GenerationRequest([], None))
        with pytest.raises(ValueError, match="context"):
            batcher.submit(GenerationRequest([5] * 10, None, SamplingParams(max_tokens=model.config.max_position_embeddings)))
        wrong = MergedPrefix(kv={"self": torch.zeros(2, 2, 2, 3, 4)}, meta={})
        with pytest.raises(pt.PrefixFileError, match="head_dim"):
            batcher.submit(GenerationRequest([5], wrong))


@pytest.mark.real
def test_smollm2_mixed_batch_equals_each_request_alone(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    french = pt.PrefixModel(model, pt.PrefixConfig(length=5, init_text="Translate to French:"), tokenizer=tok).merge()
    summary = pt.PrefixModel(model, pt.PrefixConfig(length=3, init_text="Summary:"), tokenizer=tok).merge()
    cases = [(french, "The cat sat on"), (summary, "name : Alimentum | area : city centre"), (None, "Once upon a time"),
             (french, "Good morning")]
    with Batcher(model, tok, config(batch_window_ms=0)) as batcher:
        first = batcher.submit(GenerationRequest(tok(cases[0][1])["input_ids"], cases[0][0], SamplingParams(max_tokens=12)))
        while batcher.running == 0:  # let it start alone, so the others join a running batch
            time.sleep(0.001)
        rest = batcher.submit_all([GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=12))
                                   for pre, p in cases[1:]])
        got = [h.result(60) for h in [first, *rest]]
    for (pre, prompt), c in zip(cases, got):
        assert c.token_ids == alone(model, tok, pre, prompt, 12), prompt


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefixes_ride_in_the_cache_and_rows_equal_the_per_step_path(arch, impl, monkeypatch):
    """Where a cache can hold the prefix exactly, prefill writes each row's prefix into it (left-padded
    slots for shorter prefixes and for rows without one) and decode steps run the stock attention.
    Rows that join the running batch mid-decode and rows that leave early still equal each request
    alone through the attention functions' path (the prefix concatenated per layer and step)."""
    import prefixtune.engine as engine
    import prefixtune.serve.batcher as batcher_module
    from prefixtune.kv_cache import ReservedLayer

    reserved = []  # each new batch's cache, converted so decoding steps write in place
    convert = batcher_module.reserve_layers
    monkeypatch.setattr(batcher_module, "reserve_layers", lambda c, room: reserved.append(convert(c, room)) or c)
    model, tok = tiny(arch, impl), char_tokenizer()
    prefixes = [random_prefix(model, n, seed=20 + n) for n in (5, 2, 3)] + [None]
    head = (prefixes[0], "The quick brown fox", 24)
    cases = [(prefixes[(i + 1) % 4], PROMPTS[i % 5], 3 + 3 * i) for i in range(6)]
    with Batcher(model, tok, config(max_batch_size=8, batch_window_ms=0)) as batcher:
        first = batcher.submit(GenerationRequest(tok(head[1])["input_ids"], head[0], SamplingParams(max_tokens=head[2])))
        while batcher.steps < 2 and not first.future.done():
            time.sleep(0.001)
        rest = batcher.submit_all([GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=n))
                                   for pre, p, n in cases])
        got = [h.result(60).token_ids for h in [first, *rest]]
        assert batcher.cached_prefills >= 2, "prefill did not put the prefixes into the cache"
        assert batcher.largest_batch > 2  # the later rows joined the running head
    assert reserved and all(isinstance(layer, ReservedLayer) for c in reserved for layer in c.layers)
    monkeypatch.setattr(engine, "cached_prefix", lambda *a, **k: None)  # the reference: per-step prefixes
    want = [alone(model, tok, pre, prompt, n) for pre, prompt, n in [head, *cases]]
    assert got == want
    assert len({tuple(t) for t in got[1:5]}) > 1  # different prefixes, different answers: not vacuous


def test_prefill_groups_trade_padding_against_passes():
    lengths = [3, 14, 4, 15, 5, 4, 6]
    groups = prefill_groups(lengths, overhead_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3, 4, 4, 5, 6], [14, 15]]
    assert len(prefill_groups(lengths, overhead_tokens=1000)) == 1  # passes are dear: one batch
    assert len(prefill_groups(lengths, overhead_tokens=0)) == len(set(lengths))  # padding is dear: no padding


@pytest.mark.parametrize("first", ["no prefix", "prefix"])
def test_rows_with_and_without_prefixes_join_each_other(setup, first):
    """A running batch without any prefix takes prefixed rows (and the other way round); rows leave in between."""
    model, tok, prefixes = setup
    first_prefix, others = (None, prefixes[:3]) if first == "no prefix" else (prefixes[1], [None, None, prefixes[0]])
    with Batcher(model, tok, config(batch_window_ms=0)) as batcher:
        head = batcher.submit(GenerationRequest(tok("hello")["input_ids"], first_prefix, SamplingParams(max_tokens=25)))
        while batcher.steps < 3 and not head.future.done():
            time.sleep(0.001)
        rest = batcher.submit_all([GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=3 + 4 * i))
                                   for i, (pre, p) in enumerate(zip(others, PROMPTS))])
        got = [h.result(30) for h in [head, *rest]]
        assert batcher.largest_batch == 4  # they joined the running head
    assert got[0].token_ids == alone(model, tok, first_prefix, "hello", 25)
    for (pre, prompt), c, n in zip(zip(others, PROMPTS), got[1:], (3, 7, 11)):
        assert c.token_ids == alone(model, tok, pre, prompt, n)


def test_work_budget_bounds_the_batch_and_the_queue(setup):
    """max_batch_tokens: a row that can never fit is refused for good (ValueError: 400), work that
    does not fit the queue now is QueueFull (429), and the running batch never outgrows the budget:
    two 160-slot rows under a 200-slot budget run one after the other, each equal to running alone."""
    model, tok, prefixes = setup
    batcher = Batcher(model, tok, config(max_batch_tokens=200, max_prompt_tokens=40, batch_window_ms=0)).start()
    try:
        def request(prompt: str, max_tokens: int, prefix=None):
            return GenerationRequest(tok(prompt)["input_ids"], prefix,
                                     SamplingParams(max_tokens=max_tokens, ignore_eos=True))

        with pytest.raises(ValueError, match="max_prompt_tokens"):
            batcher.submit(request("x" * 41, 1))
        with pytest.raises(ValueError, match=r"needs 201 token slots.*max_batch_tokens"):
            batcher.submit(request("hello", 191, prefixes[1]))  # 5 prefix + 5 prompt + 191
        with pytest.raises(ValueError, match="needs 210 token slots"):  # each fits, all three cannot
            batcher.submit_all([request("hello", 65) for _ in range(3)])
        seen = []
        first = batcher.submit(request("hello", 155))  # 160 slots
        deadline = time.monotonic() + 10
        while batcher.running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        second = batcher.submit(request("xy", 158, prefixes[0]))  # 2 + 2 + 158 = 162: waits in the queue
        with pytest.raises(QueueFull, match="busy"):
            batcher.submit(request("Z", 100))  # 101 more waiting slots would pass 200
        while not second.future.done():
            seen.append(batcher.batch_slots)
            time.sleep(0.002)
        for handle, prefix, prompt, n in ((first, None, "hello", 155), (second, prefixes[0], "xy", 158)):
            got = handle.result().token_ids  # ignore_eos: the reference (cut at EOS) is where they must agree
            want = alone(model, tok, prefix, prompt, n)
            assert len(got) == n and got[:len(want)] == want
        assert max(seen) <= 200 and batcher.largest_batch == 1
        assert batcher.queue_depth == 0 and batcher._queued_slots == 0
    finally:
        batcher.stop()


def test_prefix_prompt_and_ptuning_rows_share_batches_and_equal_each_request_alone(setup):
    """Soft prompts are served mixed with prefixes and plain rows, joining a running batch."""
    from prefixtune.engine import lay_out

    model, tok, prefixes = setup
    g = torch.Generator().manual_seed(7)
    hidden = model.get_input_embeddings().embedding_dim
    prompt = MergedPrefix(kv={}, embeds=torch.randn(3, hidden, generator=g),
                          meta={"method": "prompt", "template": [["v", 3], ["s"]]})
    anchor = tok("=")["input_ids"]
    ptuning = MergedPrefix(kv={}, embeds=torch.randn(3, hidden, generator=g),
                           meta={"method": "ptuning", "template": [["v", 2], ["s"], ["t", anchor], ["v", 1]]})
    arts = [prefixes[0], prompt, ptuning, None, prefixes[1], prompt]
    cases = [(a, PROMPTS[i % 5], 5 + i) for i, a in enumerate(arts)]

    def reference(art, text, n):
        ids = tok(text)["input_ids"]
        laid = lay_out(art.template, ids) if art is not None and art.embeds is not None else ids
        out = pt.generate_with_prefix(model, pt.RowPrefixes.per_row([art]) if art is not None else None,
                                      torch.tensor([laid]), max_new_tokens=n, do_sample=False)[0, len(laid):].tolist()
        eos = model.generation_config.eos_token_id
        return out[:out.index(eos)] if eos in out else out

    with Batcher(model, tok, config(max_batch_size=4, batch_window_ms=0)) as batcher:
        handles = batcher.submit_all([GenerationRequest(tok(p)["input_ids"], a, SamplingParams(max_tokens=n))
                                      for a, p, n in cases])
        got = [h.result(60).token_ids for h in handles]
    assert got == [reference(a, p, n) for a, p, n in cases]


def test_infix_artifacts_are_refused_by_the_server(setup):
    model, tok, prefixes = setup
    infix = MergedPrefix(kv=prefixes[0].kv, meta={"method": "infix", "insert": "target"})
    with Batcher(model, tok, config()) as batcher:
        with pytest.raises(ValueError, match="infix"):
            batcher.check(GenerationRequest(tok("hi")["input_ids"], infix, SamplingParams(max_tokens=3)))


def test_a_full_reserved_cache_gets_the_rows_room_not_doubled(setup, monkeypatch):
    """With room for 2 tokens at a time, rows of 7 tokens refill the room before each step that needs it
    (the layer's own doubling never runs: the budget bounds the cache by its slots) and still equal each
    request alone."""
    import prefixtune.serve.batcher as batcher_module
    from prefixtune.kv_cache import ReservedLayer

    model, tok, prefixes = setup
    pre = prefixes[1]
    monkeypatch.setattr(batcher_module, "RESERVE_AHEAD", 2)
    monkeypatch.setattr(ReservedLayer, "_reallocate", lambda *a: pytest.fail("a reserved layer doubled"))
    prompts = PROMPTS[:3]
    with Batcher(model, tok, config(batch_window_ms=50)) as batcher:
        got = [h.result(60).token_ids for h in batcher.submit_all(
            [GenerationRequest(tok(p)["input_ids"], pre, SamplingParams(max_tokens=7)) for p in prompts])]
    assert got == [alone(model, tok, pre, p, 7) for p in prompts]
    assert max(map(len, got)) > 2  # the room was refilled at least once
