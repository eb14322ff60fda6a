"""The server's settings: one dataclass, each field with its help text, checked on creation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..config import ConfigError
from ..decode_config import PRECISIONS


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeConfig:
    """How the server batches, bounds and times out requests."""

    max_batch_size: int = field(default=32, metadata={
        "help": "Most requests decoded together in one batch (rows may use different prefixes)."})
    batch_window_ms: float = field(default=10.0, metadata={
        "help": "When the engine is idle, how long it waits after the first request for others to join its batch. "
                "While a batch runs, new requests join between decode steps without waiting."})
    max_queue: int = field(default=64, metadata={
        "help": "Most requests waiting to join the batch; beyond it requests get 429 with a Retry-After header."})
    prefill_overhead_tokens: int = field(default=32, metadata={
        "help": "New prompts are prefilled in length buckets: one more forward pass is worth it when it saves more "
                "than this many padded tokens (a pass costs about this much beyond its tokens)."})
    request_timeout_s: float = field(default=120.0, metadata={
        "help": "A request not finished after this many seconds (queue + generation) gets 504 and is dropped."})
    retry_after_s: int = field(default=1, metadata={"help": "Seconds sent in Retry-After with a 429."})
    default_max_tokens: int = field(default=16, metadata={
        "help": "max_tokens when a request does not say (OpenAI's default is 16)."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    max_prompts_per_request: int = field(default=32, metadata={
        "help": "Most prompts in one request's prompt list."})
    max_prompt_tokens: int = field(default=4096, metadata={
        "help": "Most tokens in one prompt; a longer prompt gets 400. Bounds one prefill's work and its "
                "attention memory (which grows with the square of the prompt)."})
    max_batch_tokens: int = field(default=16384, metadata={
        "help": "Work and KV-cache budget, in token slots. A row needs prefix + prompt + max_tokens slots; rows "
                "share one left-padded cache, so the running batch is admitted only while rows x (longest "
                "prefix + longest prompt+max_tokens) stays within it. The same budget bounds the work waiting "
                "in the queue: a request that does not fit there now gets 429, one that could never fit "
                "(its rows need more than the whole budget) gets 400. KV memory = this x layers x 2 x kv_heads "
                "x head_dim x bytes per value (docs/serving.md)."})
    max_request_kb: int = field(default=1024, metadata={
        "help": "Largest body of a request other than an upload; a larger declared or sent body gets 413."})
    prefix_cache_size: int = field(default=64, metadata={
        "help": "Most loaded prefixes kept in memory (least recently used are dropped first)."})
    prefix_cache_bytes: int = field(default=512 * 2**20, metadata={
        "help": "Memory budget of the loaded prefixes kept in memory, in bytes (default 512 MiB); least recently "
                "used are dropped first. A loaded prefix costs about its file size. A prefix larger than the "
                "budget is served without being kept."})
    max_upload_mb: float = field(default=64.0, metadata={"help": "Largest prefix file accepted by POST /v1/prefixes."})
    precision: str = field(default="fp32", metadata={
        "help": "Number format of the served model: fp32 (as loaded); bf16 (its weights cast to bfloat16 once at "
                "start, so weights, activations and the KV cache are bf16, no autocast: faster where the CPU has "
                "fast bf16, halves the KV memory, outputs may differ a little from fp32's); auto (bf16 only where "
                "this machine measured it at least 1.10x faster: the measurement training uses, cached per CPU)."})
    torch_threads: int | None = field(default=None, metadata={
        "help": "torch intra-op threads for the model worker. None: every core this process may use."})
    shutdown_timeout_s: float = field(default=60.0, metadata={
        "help": "On shutdown, how long accepted requests may take to finish before they are failed."})
    store_poll_s: float = field(default=5.0, metadata={
        "help": "How often cached prefixes are re-checked against the store, for removals made through another "
                "replica or process. PostgreSQL also pushes each change at once (NOTIFY); this bounds a lost push."})
    store_sweep_s: float = field(default=300.0, metadata={
        "help": "How often the store's files folder is swept of files an interrupted upload left without a row."})

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"ServeConfig.{name}: {message}, got {getattr(self, name)!r}")

        check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        check(self.batch_window_ms >= 0, "batch_window_ms", "must be >= 0")
        check(self.max_queue >= 1, "max_queue", "must be >= 1")
        check(self.prefill_overhead_tokens >= 0, "prefill_overhead_tokens", "must be >= 0")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")
        check(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
              "must be between 1 and max_tokens_limit")
        check(self.max_prompts_per_request >= 1, "max_prompts_per_request", "must be >= 1")
        check(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        check(self.max_batch_tokens >= 2, "max_batch_tokens", "must be >= 2")
        check(self.max_request_kb >= 1, "max_request_kb", "must be >= 1")
        check(self.prefix_cache_size >= 1, "prefix_cache_size", "must be >= 1")
        check(isinstance(self.prefix_cache_bytes, int) and self.prefix_cache_bytes >= 0, "prefix_cache_bytes",
              "must be a whole number of bytes >= 0")
        check(self.max_upload_mb > 0, "max_upload_mb", "must be > 0")
        check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1 or None")
        check(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0")
        check(self.store_poll_s > 0, "store_poll_s", "must be > 0")
        check(self.store_sweep_s > 0, "store_sweep_s", "must be > 0")

    @property
    def threads(self) -> int:
        return self.torch_threads or available_cores()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
