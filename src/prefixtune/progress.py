"""Progress for long commands: a tqdm bar (steps, ETA, tokens/s, latest loss) on a terminal, plain
log lines otherwise (CI, files), so logs stay greppable and terminals stay readable."""

from __future__ import annotations

import contextlib
import sys

_BAR = None  # the bar being shown, so log lines print above it instead of through it


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_print(line: str) -> None:
    if _BAR is not None:
        _BAR.write(line)
    else:
        print(line, flush=True)


@contextlib.contextmanager
def _bar(make_callback, **tqdm_options):
    """Yields `make_callback(bar)` for a tqdm bar on stderr (None when not on a terminal); log lines printed
    meanwhile by `progress_print` go above the bar."""
    global _BAR
    if not on_terminal():
        yield None
        return
    # tqdm: only when a bar is drawn; the CLI imports this module (`prefixtune --help` start-up time)
    from tqdm import tqdm

    bar = _BAR = tqdm(dynamic_ncols=True, file=sys.stderr, **tqdm_options)
    try:
        yield make_callback(bar)
    finally:
        _BAR = None
        bar.close()


def training_progress():
    """Yields `progress(record)` for `train()` (None when not on a terminal)."""
    def callback(bar):
        def progress(record: dict) -> None:
            bar.total = record["total"]
            bar.n = record["step"]
            speed = (f"{record['tokens_per_s']:.0f} tok/s" if record.get("tokens_per_s") else
                     f"{record.get('examples_per_s', 0):.1f} examples/s")  # classifiers: no target tokens
            bar.set_postfix_str(f"loss {record['loss']:.4f} · {speed}", refresh=False)
            bar.refresh()
        return progress

    return _bar(callback, total=None, unit="step")


def decoding_progress(total: int, label: str = "generating"):
    """Yields `progress(done, total)` for `generate_texts` (None when not on a terminal)."""
    def callback(bar):
        def progress(done: int, _total: int) -> None:
            bar.update(done - bar.n)
        return progress

    return _bar(callback, total=total, unit="src", desc=label)


def count_progress(label: str, unit: str = "run"):
    """Yields `update(done, total)` for a count whose total may change (a sweep's runs); None when not on a
    terminal."""
    def callback(bar):
        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        return update

    return _bar(callback, total=None, unit=unit, desc=label)
