"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Only what the server needs: counters, gauges and histograms, with optional labels, thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.label_names else [])
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (`fn`), or set by the code."""

    kind = "gauge"

    def __init__(self, name, help, fn=None):
        super().__init__(name, help)
        self.fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def render(self) -> list[str]:
        value = self.fn() if self.fn is not None else self._value
        return self.header() + [f"{self.name} {_number(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines, cumulative = self.header(), 0
        for bound, c in zip(self.buckets, counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]
        return lines


class TokenRate:
    """Tokens per second over the last `window` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self.window


class ServerMetrics:
    """Everything /metrics reports. The batcher and the app update it; gauges read live state."""

    def __init__(self):
        self.batch_size = Histogram("prefixtune_batch_size", "Rows in each decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.request_latency = Histogram(
            "prefixtune_request_latency_seconds", "Time from a completion request's arrival to its last token.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("prefixtune_generated_tokens_total", "Tokens generated.")
        self.prompt_tokens = Counter("prefixtune_prompt_tokens_total", "Prompt tokens prefilled.")
        self.requests = Counter("prefixtune_http_requests_total", "HTTP requests answered, by route and status.",
                                labels=("route", "status"))
        self.rate = TokenRate()
        self.tokens_per_second = Gauge("prefixtune_tokens_per_second",
                                       "Tokens generated per second over the last 10 seconds.", fn=self.rate.per_second)
        self.queue_depth = Gauge("prefixtune_queue_depth", "Requests waiting to join the running batch.")
        self.running = Gauge("prefixtune_running_requests", "Requests in the running batch.")
        self.cached_prefixes = Gauge("prefixtune_cached_prefixes", "Prefixes loaded in memory.")
        self.cached_prefix_bytes = Gauge("prefixtune_cached_prefix_bytes",
                                         "Bytes held by the loaded prefixes, of prefix_cache_bytes.")
        self.batch_slots = Gauge("prefixtune_batch_token_slots",
                                 "Token slots the running batch may fill (rows x longest row), of max_batch_tokens.")
        self.cancelled = Counter("prefixtune_cancelled_requests_total",
                                 "Prompts whose rows were dropped before finishing, by why (disconnect, timeout).",
                                 labels=("reason",))

    def add_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        self.rate.add(n)

    def render(self) -> str:
        metrics = [self.queue_depth, self.running, self.batch_size, self.tokens, self.prompt_tokens,
                   self.tokens_per_second, self.request_latency, self.requests, self.cached_prefixes,
                   self.cached_prefix_bytes, self.batch_slots, self.cancelled]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
