"""Continuous batching over one frozen model: many requests, each with its own prefix and sampling.

One worker thread owns the model and loops:
  1. admit waiting requests (up to `max_batch_size` rows in all): prefill them together in one
     left-padded forward pass, choose their first token, then merge them into the running batch by
     left-padding the shorter KV cache, so every row shares one cache length;
  2. one decode step for every running row, each attending to its own prefix: where a cache can hold
     the prefix exactly (`attention.cached_prefix`), each row's prefix key/values are written into
     the cache once at prefill, ahead of its prompt, and steps run the model's stock attention;
     elsewhere (soft prompts in the prefill group, models where the cache cannot stand in) the
     attention functions add each row's prefix per layer and step;
  3. rows that are done (EOS, a stop string, max_tokens, cancelled) leave via index_select.
Other threads only `submit()` and wait on futures, so the model never runs twice at once.

Work is bounded by `max_batch_tokens` token slots (see `Slots`): the running batch is admitted only
while its cache can never outgrow the budget, and the queue holds at most one more budget of work.

A row's output equals running it alone: padding is masked, positions are counted from the mask
(whose columns include a cached prefix's slots, or else plus the row's prefix length), and a row's
prefix is visible to that row only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from ..engine import RESERVE_AHEAD, forward_with_prefix, lay_out
from ..kv_cache import ReservedLayer, reserve_layers

from ..attention import RowPrefixes, cached_prefix, layout_of, repeat_rows
from ..models import model_name
from ..prefix import MergedPrefix, check_compatible
from .config import ServeConfig
from .metrics import ServerMetrics
from .prefix_cache import LoadedPrefix
from .sampling import SamplingParams, TextTracker, choose_tokens, decode

log = logging.getLogger("prefixtune.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The batcher is stopping and accepts no new requests."""


class PrefixRemoved(Exception):
    """The request's prefix was removed before the request started."""


class RequestCancelled(Exception):
    """The request was cancelled (its client left or timed out)."""


@dataclass
class GenerationRequest:
    """One prompt to complete. `on_text(piece)` (optional) receives streamed text on the worker thread."""

    prompt_ids: list[int]
    prefix: LoadedPrefix | MergedPrefix | None = None
    params: SamplingParams = SamplingParams()
    on_text: Callable[[str], None] | None = None

    def model_ids(self) -> list[int]:
        """What the model reads: the prompt, with a soft prompt's (prompt tuning, P-tuning) virtual
        tokens laid out around it by the artifact's template."""
        prefix = _merged(self.prefix)
        if prefix is None or prefix.embeds is None:
            return self.prompt_ids
        return lay_out(prefix.template, self.prompt_ids)


def _kv_length(prefix: MergedPrefix | None) -> int:
    """Key/value slots a prefix adds in front of every layer (0 for soft prompts: theirs are tokens)."""
    return next(iter(prefix.kv.values())).shape[3] if prefix is not None and prefix.kv else 0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]          # generated tokens, without the EOS token (unless ignore_eos)
    finish_reason: str            # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int        # tokens generated, the EOS token included


@dataclass(frozen=True)
class Slots:
    """How many token slots a set of rows may fill in the shared, left-padded KV cache: every row is
    padded to the longest prefix and to the longest prompt + max_tokens among them."""

    rows: int = 0
    prefix: int = 0   # longest prefix
    span: int = 0     # longest prompt + max_tokens

    @property
    def total(self) -> int:
        return self.rows * (self.prefix + self.span)

    def plus(self, request: GenerationRequest) -> "Slots":
        return Slots(self.rows + 1, max(self.prefix, _kv_length(_merged(request.prefix))),
                     max(self.span, len(request.model_ids()) + request.params.max_tokens))


def row_slots(request: GenerationRequest) -> int:
    return Slots().plus(request).total


class RequestHandle:
    """What `submit` returns: the future of a Completion, timestamps, and `cancel()`."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.slots = row_slots(request)
        self.future: concurrent.futures.Future[Completion] = concurrent.futures.Future()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Drop the request: it leaves the queue or the running batch at the next step."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)


_MALLOC_TRIM = None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`; elsewhere nothing).

    A batch's transient buffers (attention over prefixes, cache copies) are a few MB each: glibc
    serves them from its heaps and keeps the pages after they are freed, so without this the
    process keeps the high-water mark of its largest batch. Called when the worker goes idle."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _merged(prefix: LoadedPrefix | MergedPrefix | None) -> MergedPrefix | None:
    return prefix.prefix if isinstance(prefix, LoadedPrefix) else prefix


class _Row:
    """One request while it is in the running batch."""

    def __init__(self, handle: RequestHandle, tokenizer, eos_ids: set[int], device):
        self.handle = handle
        self.request = handle.request
        self.params = handle.request.params
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefix = _merged(handle.request.prefix)
        self.generated: list[int] = []
        self.count = 0
        self.generator = None
        if not self.params.greedy and self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        # decoding text every step costs time: only for streaming or stop strings
        needs_text = self.request.on_text is not None or bool(self.params.stop)
        self.tracker = TextTracker(tokenizer, self.params.stop) if needs_text else None

    def add(self, token: int) -> str | None:
        """Record the next token; the finish reason when the row is done, else None."""
        self.count += 1
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.monotonic()
        if token in self.eos_ids and not self.params.ignore_eos:
            return "stop"
        self.generated.append(token)
        if self.tracker is not None:
            if self.tracker.update(self.generated):
                return "stop"
            self._emit(self.tracker.take(final=False))
        return "length" if self.count >= self.params.max_tokens else None

    def _emit(self, piece: str) -> None:
        if piece and self.request.on_text is not None:
            self.request.on_text(piece)

    def finish(self, reason: str) -> Completion:
        if self.tracker is not None:
            self.tracker.update(self.generated, final=True)
            self._emit(self.tracker.take(final=True))
            text = self.tracker.text
        else:
            text = decode(self.tokenizer, self.generated)
        return Completion(text=text, token_ids=list(self.generated), finish_reason=reason,
                          prompt_tokens=len(self.request.prompt_ids), completion_tokens=self.count)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` at the front of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _set_layer(layer, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
    """A cache layer's new contents: a ReservedLayer keeps `room` free slots after them, a stock layer grows by cat."""
    if isinstance(layer, ReservedLayer):
        layer.assign(keys, values, room)
    else:
        layer.keys, layer.values = keys, values


def _first_used_column(used: torch.Tensor) -> int:
    """Index of the first column where any row is real (used: (rows, cols) bool)."""
    cols = used.any(0)
    return int(cols.int().argmax()) if bool(cols.any()) else used.shape[1]


def _select_prefixes(prefixes: RowPrefixes | None, index: torch.Tensor) -> RowPrefixes | None:
    """Keep rows `index`, and drop prefix slots no remaining row uses."""
    if prefixes is None:
        return None
    kv, valid = {}, {}
    for kind in prefixes.kv:
        v = prefixes.valid[kind].index_select(0, index)
        start = _first_used_column(v)
        if start < v.shape[1]:
            kv[kind] = prefixes.kv[kind].index_select(2, index)[:, :, :, :, start:]
            valid[kind] = v[:, start:]
    return RowPrefixes(kv=kv, valid=valid) if kv else None


def _rows_of(p: RowPrefixes | None, kind: str, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv, valid) of one kind; rows without that kind get zero prefix slots."""
    if p is not None and kind in p.kv:
        return p.kv[kind], p.valid[kind]
    layers, two, _, heads, _, head_dim = like.shape
    return (like.new_zeros(layers, two, rows, heads, 0, head_dim),
            torch.zeros(rows, 0, dtype=torch.bool, device=like.device))


def _concat_prefixes(a: RowPrefixes | None, rows_a: int, b: RowPrefixes | None, rows_b: int) -> RowPrefixes | None:
    """Rows of `a` then rows of `b`; prefix slots stay right-aligned (left-padded), as in per_row."""
    kinds = sorted(set(a.kv if a else ()) | set(b.kv if b else ()))
    if not kinds:
        return None
    kv, valid = {}, {}
    for kind in kinds:
        like = a.kv[kind] if a is not None and kind in a.kv else b.kv[kind]
        (ka, va), (kb, vb) = _rows_of(a, kind, rows_a, like), _rows_of(b, kind, rows_b, like)
        width = max(va.shape[1], vb.shape[1])
        kv[kind] = torch.cat([_pad_left(ka, width, 4), _pad_left(kb, width, 4)], dim=2)
        valid[kind] = torch.cat([_pad_left(va, width, 1), _pad_left(vb, width, 1)], dim=0)
    return RowPrefixes(kv=kv, valid=valid)


class _Batch:
    """The running batch: rows, their shared KV cache (left-padded) and attention mask."""

    def __init__(self, rows: list[_Row], cache, mask: torch.Tensor, last: torch.Tensor, prefixes: RowPrefixes | None):
        self.rows = rows
        self.cache = cache          # HF DynamicCache; layers[i].keys: (rows, kv_heads, seq, head_dim)
        self.mask = mask            # (rows, seq) long, 1 where the cache holds a real token
        self.last = last            # (rows,) each row's newest token, not yet in the cache
        self.prefixes = prefixes    # one prefix per row, or None when no row has one

    def __len__(self) -> int:
        return len(self.rows)

    def extend(self, other: "_Batch") -> None:
        """Append `other`'s rows, left-padding the shorter cache so both share one length."""
        seq = max(self.mask.shape[1], other.mask.shape[1])
        room = max(self.room(), other.room())
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            _set_layer(mine, torch.cat([_pad_left(mine.keys, seq, 2), _pad_left(theirs.keys, seq, 2)]),
                       torch.cat([_pad_left(mine.values, seq, 2), _pad_left(theirs.values, seq, 2)]), room)
        self.mask = torch.cat([_pad_left(self.mask, seq, 1), _pad_left(other.mask, seq, 1)])
        self.last = torch.cat([self.last, other.last])
        self.prefixes = _concat_prefixes(self.prefixes, len(self.rows), other.prefixes, len(other.rows))
        self.rows = self.rows + other.rows

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop cache columns that are padding for every remaining row."""
        if not keep:
            self.rows = []
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = _first_used_column(mask.bool())
        self.rows = [self.rows[i] for i in keep]
        room = self.room()
        for layer in self.cache.layers:
            _set_layer(layer, layer.keys[:, :, start:].index_select(0, index),
                       layer.values[:, :, start:].index_select(0, index), room)
        self.mask = mask[:, start:]
        self.last = self.last.index_select(0, index)
        self.prefixes = _select_prefixes(self.prefixes, index)

    def make_room(self) -> None:
        """Before a decode step: a full reserved cache gets `room()` more slots (not the layer's own doubling,
        which could hold more than the rows may ever fill: the budget bounds the cache by its slots)."""
        for layer in self.cache.layers:
            if isinstance(layer, ReservedLayer) and layer.length >= layer.capacity:
                layer.assign(layer.keys, layer.values, self.room())

    def room(self) -> int:
        """Cache slots to reserve past the current length: the most tokens a row may still add, at most
        RESERVE_AHEAD (a longer run grows the buffers; an early EOS leaves nothing large reserved)."""
        return min(RESERVE_AHEAD, max((r.params.max_tokens - r.count for r in self.rows), default=1))


def prefill_groups(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Split prompts (by index) into prefill batches: sorted by length, cut where the padding saved
    outweighs the fixed cost of one more forward pass (`overhead_tokens`, in padded-token units).
    Minimizes sum over batches of (overhead + rows * longest prompt) exactly (dynamic programming)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    n = len(ordered)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * ordered[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append([order[k] for k in range(cut[j], j)])
        j = cut[j]
    return groups[::-1]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


class Batcher:
    """The request queue and the model worker thread.

        batcher = Batcher(model, tokenizer, ServeConfig()).start()
        handle = batcher.submit(GenerationRequest(prompt_ids, prefix, SamplingParams(max_tokens=30)))
        completion = handle.result()
        batcher.stop()
    """

    def __init__(self, model, tokenizer, config: ServeConfig | None = None, metrics: ServerMetrics | None = None):
        layout = layout_of(model)
        if layout.is_encoder_decoder or not layout.arch.shift_positions:
            raise ValueError(f"the batching server supports decoder-only models; {model_name(model)} is not one")
        self.model = model
        self.layout = layout
        self.tokenizer = tokenizer
        self.config = config or ServeConfig()
        self.metrics = metrics or ServerMetrics()
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else 0
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cond = threading.Condition()
        self._pending: deque[RequestHandle] = deque()
        self._batch: _Batch | None = None
        self._queued_slots = 0  # sum of row_slots over self._pending
        self._stopping = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self.steps = 0          # decode steps run
        self.cached_prefills = 0  # prefills whose rows' prefixes went into the cache (no per-step prefix)
        self.largest_batch = 0  # most rows ever decoded together
        self.metrics.queue_depth.fn = lambda: self.queue_depth
        self.metrics.running.fn = lambda: self.running
        self.metrics.batch_slots.fn = lambda: self.batch_slots

    # -- the caller's side ---------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch) if batch is not None else 0

    @property
    def batch_slots(self) -> int:
        """Token slots the running batch may fill (never above max_batch_tokens)."""
        batch = self._batch
        return self._slots_of(batch.rows).total if batch is not None else 0

    @staticmethod
    def _slots_of(rows) -> Slots:
        slots = Slots()
        for row in rows:
            slots = slots.plus(row.request)
        return slots

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefixtune-model-worker", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> "Batcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError when the request cannot run on this model."""
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt_ids) > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; this server takes at most "
                             f"{self.config.max_prompt_tokens} (max_prompt_tokens)")
        prefix = _merged(request.prefix)
        if prefix is not None:
            # shapes only: the store checked the base-model fingerprint when the file was added
            check_compatible(prefix, self.model, source=getattr(request.prefix, "name", "prefix"), check_fingerprint=False)
            if prefix.is_infix:
                raise ValueError("infix artifacts are not served (an infix needs each row's source/target boundary); "
                                 "serve a prefix, prompt or P-tuning artifact")
        if self.max_positions:
            length = _kv_length(prefix)
            prompt = len(request.model_ids())
            total = prompt + request.params.max_tokens + length
            if total > self.max_positions:
                raise ValueError(f"prompt ({prompt} tokens) + max_tokens ({request.params.max_tokens}) "
                                 f"+ prefix ({length}) = {total} exceeds the model's context of {self.max_positions}")

    def submit(self, request: GenerationRequest) -> RequestHandle:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue all of `requests` or none of them (QueueFull, ShuttingDown, ValueError)."""
        if len(requests) > self.config.max_queue:
            raise ValueError(f"{len(requests)} prompts in one request; the queue holds at most {self.config.max_queue}")
        for r in requests:
            self.check(r)
        handles = [RequestHandle(r) for r in requests]
        budget = self.config.max_batch_tokens
        need = sum(h.slots for h in handles)
        if need > budget:  # could never be queued: refuse for good, not "retry later"
            raise ValueError(f"this request needs {need} token slots (prefix + prompt + max_tokens, summed over its "
                             f"prompts); this server's work budget is {budget} (max_batch_tokens): lower max_tokens, "
                             "shorten the prompts or send fewer per request")
        with self._cond:
            if self._stopping or not self.alive:
                raise ShuttingDown("the server is shutting down" if self._stopping else "the model worker is not running")
            if len(self._pending) + len(handles) > self.config.max_queue:
                raise QueueFull(f"too many requests waiting ({len(self._pending)} queued, bound {self.config.max_queue}); "
                                "retry later", retry_after=self.config.retry_after_s)
            if self._queued_slots + need > budget:
                raise QueueFull(f"the server is busy (work waiting: {self._queued_slots} of {budget} token slots, this "
                                f"request needs {need}); retry later", retry_after=self.config.retry_after_s)
            self._pending.extend(handles)
            self._queued_slots += need
            self._cond.notify_all()
        return handles

    def generate(self, requests: list[GenerationRequest], timeout: float | None = None) -> list[Completion]:
        """Submit and wait for all (a convenience for scripts and tests)."""
        return [h.result(timeout) for h in self.submit_all(requests)]

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with `drain`, finish the accepted ones first (up to `timeout` s)."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._abort = True
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # drain took too long: fail what is left
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self._thread.join()

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        self._ran_since_trim = False
        with torch.inference_mode():
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                try:
                    if admitted:
                        self._admit(admitted)
                    if self._batch is not None:
                        self._step()
                except Exception as e:  # never let one bad batch kill the server
                    log.exception("model worker: a batch failed")
                    self._fail([*(r.handle for r in (self._batch.rows if self._batch else [])), *admitted], e)
                    self._batch = None
                if self._batch is None and not self._pending and (admitted or self._ran_since_trim):
                    release_free_memory()  # idle: give the batch's freed buffers back to the OS
                    self._ran_since_trim = False
                elif admitted:
                    self._ran_since_trim = True
        self._fail([*(r.handle for r in (self._batch.rows if self._batch else [])), *self._pending],
                   ShuttingDown("the server shut down before this request finished"))
        self._batch = None
        self._pending.clear()
        self._queued_slots = 0

    def _next_admissions(self) -> list[RequestHandle] | None:
        """Requests to add to the batch now ([] to just decode); None when the worker should exit."""
        window = self.config.batch_window_ms / 1000
        with self._cond:
            if self._abort:
                return None
            if self._batch is None:
                while not self._pending:
                    if self._stopping or self._abort:
                        return None
                    self._cond.wait()
                # idle start: give requests arriving together a moment to share the first batch
                deadline = time.monotonic() + window
                while len(self._pending) < self.config.max_batch_size and not self._abort:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._take_admissible()

    def _take_admissible(self) -> list[RequestHandle]:
        """Pop queued requests, first come first served, while the batch stays within its row and
        token-slot budgets (the head of the queue always fits an empty batch: submit checked it)."""
        for h in [h for h in self._pending if h.cancelled]:  # a client that left frees its place now
            self._pending.remove(h)
            self._queued_slots -= h.slots
            self._fail([h], RequestCancelled("cancelled before it started"))
        slots = self._slots_of(self._batch.rows) if self._batch is not None else Slots()
        taken = []
        while self._pending and slots.rows < self.config.max_batch_size:
            grown = slots.plus(self._pending[0].request)
            if grown.total > self.config.max_batch_tokens and slots.rows > 0:
                break
            slots = grown
            h = self._pending.popleft()
            self._queued_slots -= h.slots
            taken.append(h)
        return taken

    def _fail(self, handles, error: Exception) -> None:
        for h in handles:
            h.finished_at = time.monotonic()
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # already done or cancelled
                h.future.set_exception(error)

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill new requests (in length buckets) and merge them into the running batch."""
        live = []
        for h in handles:
            if h.cancelled or not h.future.set_running_or_notify_cancel():  # from now on it cannot be cancelled
                self._fail([h], RequestCancelled("cancelled before it started"))
            elif isinstance(h.request.prefix, LoadedPrefix) and h.request.prefix.revoked:
                self._fail([h], PrefixRemoved(f"prefix {h.request.prefix.name!r} was removed"))
            else:
                live.append(h)
        lengths = [len(h.request.model_ids()) for h in live]
        for group in prefill_groups(lengths, self.config.prefill_overhead_tokens):
            new = self._prefill([live[i] for i in group])
            if len(new) == 0:
                continue
            if self._batch is None:
                self._batch = new
            else:
                self._batch.extend(new)
            self.largest_batch = max(self.largest_batch, len(self._batch))

    def _prefill(self, handles: list[RequestHandle]) -> _Batch:
        """One left-padded forward pass over new prompts; their first tokens are chosen here."""
        rows = [_Row(h, self.tokenizer, self.eos_ids, self.device) for h in handles]
        prompts = [h.request.model_ids() for h in handles]  # soft prompts' virtual tokens as negative ids
        width = max(map(len, prompts))
        ids = torch.full((len(handles), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(handles), width, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        prefixes, cache = None, None
        if any(r.prefix is not None for r in rows):
            prefixes = RowPrefixes.per_row([r.prefix for r in rows], device=self.device, dtype=self.model.dtype)
        prompt_tokens = int(mask.sum())
        laid = cached_prefix(self.model, self.layout, prefixes, len(rows)) if prefixes is not None else None
        if laid is not None:
            # From here on the prefix is cache columns ahead of the prompt: (rows, P) valid slots join the
            # mask, positions counted over the mask start after each row's prefix, and the batch carries no
            # per-row prefixes (merging and dropping rows treat the slots as any other cached tokens).
            cache, valid = laid
            mask = torch.cat([repeat_rows(valid, len(rows)).to(mask.dtype), mask], dim=1)   # (rows, P + width)
            prefixes = None
        self.cached_prefills += laid is not None
        logits, cache = self._forward(ids, mask, prefixes, cache=cache)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        for layer in cache.layers:
            if type(layer) not in (DynamicLayer, ReservedLayer):
                raise RuntimeError(f"the batching server needs full-attention caches; {model_name(self.model)} uses "
                                   f"{type(layer).__name__} (e.g. sliding-window attention)")
        new = _Batch(rows, cache, mask, torch.zeros(len(rows), dtype=torch.long, device=self.device), prefixes)
        # decoding steps then write each token in place (kv_cache.py) instead of copying the cache
        reserve_layers(cache, new.room())
        self._take_tokens(new, logits)
        return new

    def _step(self) -> None:
        """One decode step for every running row."""
        batch = self._batch
        batch.make_room()
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
        logits, batch.cache = self._forward(batch.last[:, None], mask, batch.prefixes, cache=batch.cache)
        batch.mask = mask
        self.metrics.batch_size.observe(len(batch))
        self.steps += 1
        self._take_tokens(batch, logits)
        if len(batch) == 0:
            self._batch = None

    def _forward(self, ids, mask, prefixes, cache):
        kwargs = {"logits_to_keep": 1} if self._keep_logits else {}
        # positions come from the mask (padding skipped) plus each row's prefix length
        out = forward_with_prefix(self.model, prefixes, input_ids=ids, attention_mask=mask, cache=cache,
                                  use_cache=True, **kwargs)
        return out.logits[:, -1], out.cache

    def _take_tokens(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Choose each row's next token, finish rows that are done, and keep the others."""
        tokens = choose_tokens(logits, [r.params for r in batch.rows], [r.generator for r in batch.rows])
        self.metrics.add_tokens(len(tokens))
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens)):
            if row.handle.cancelled:
                self._fail([row.handle], RequestCancelled("cancelled"))
                continue
            try:
                reason = row.add(token)
                if reason is not None:
                    completion = row.finish(reason)
            except Exception as e:  # e.g. a streaming callback failed: drop this row only
                self._fail([row.handle], e)
                continue
            if reason is None:
                keep.append(i)
            else:
                row.handle.finished_at = time.monotonic()
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # its waiter gave up
                    row.handle.future.set_result(completion)
        batch.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if len(keep) < len(batch):
            batch.keep(keep)
