"""METEOR 1.5 through the jar's `-stdio` protocol, as pycocoevalcap drives it.

Same command line as COCO / e2e-metrics (`-l en -norm`, 2 GB heap) and the same
protocol: one `SCORE ||| refs ||| hyp` line per item gives that item's sufficient
statistics, then one `EVAL ||| stats ||| ...` line gives per-item scores followed by
the corpus score (computed from summed statistics, as METEOR's file mode reports).

Unlike pycocoevalcap's wrapper, stderr goes to a temporary file (a full stderr pipe can
deadlock the JVM), a dead JVM raises a RuntimeError with its stderr instead of
hanging or returning garbage, and the process is always reaped.
"""

import contextlib
import contextvars
import subprocess
import tempfile
from typing import IO, Iterator, Sequence

from .java import find_java, meteor_jar

SHUTDOWN_TIMEOUT_S = 10.0


class MeteorProcess:
    """One METEOR JVM. Use as a context manager; starting it costs a few seconds
    (it loads the English paraphrase table), so score a whole corpus per process."""

    def __init__(self) -> None:
        jar = meteor_jar()
        cmd = [find_java(), "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            # cwd = jar folder: METEOR finds data/paraphrase-en.gz relative to it.
            self._proc = subprocess.Popen(
                cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except BaseException:
            self._stderr.close()
            raise

    def __enter__(self) -> "MeteorProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, per-item METEOR) for already validated inputs."""
        if not hyps:
            raise ValueError("METEOR needs at least one item")  # an empty EVAL line gets no answer
        stats = []
        for hyp, item_refs in zip(hyps, refs, strict=True):
            self._send(" ||| ".join(["SCORE", *(_clean(r) for r in item_refs), _clean(hyp)]))
            stats.append(self._receive())
        self._send(" ||| ".join(["EVAL", *stats]))
        per_item = [float(self._receive()) for _ in stats]
        return float(self._receive()), per_item

    def close(self) -> None:
        """Ask the JVM to exit (EOF on stdin); kill it if it does not; always reap it."""
        proc = self._proc
        try:
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:  # the JVM already died: the pipe is broken
                    pass
            try:
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()
            self._stderr.close()

    @property
    def returncode(self) -> int | None:
        """None while the JVM runs; its exit status once it has been reaped."""
        return self._proc.returncode

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise self._died() from err

    def _receive(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            raise self._died()
        return line.decode("utf-8").strip()

    def _died(self) -> RuntimeError:
        try:
            code = self._proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # stdout closed but the JVM lingers
            self._proc.kill()
            code = self._proc.wait()
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", errors="replace")[-2000:].strip()
        return RuntimeError(f"METEOR (java) exited with code {code}: {err}")


# The JVM of the innermost `shared_meteor()` block, if any
_shared: contextvars.ContextVar["MeteorProcess | None"] = contextvars.ContextVar("shared_meteor", default=None)


@contextlib.contextmanager
def shared_meteor() -> Iterator[MeteorProcess]:
    """Within the block every `meteor()` call scores in one JVM, started now.

    The JVM spends ~6 s loading its paraphrase table (measured on a 2-core Xeon: 6.7 s to score 60 E2E
    outputs in a fresh JVM, 0.45 s in one started 8 s earlier), so starting it before decoding overlaps
    that load with the decoding, and several corpora pay it once. Each `EVAL` line is scored from its
    own items only: a corpus scores the same in a shared JVM as in a fresh one (tested). Nested blocks
    reuse the outer JVM."""
    outer = _shared.get()
    if outer is not None:
        yield outer
        return
    with MeteorProcess() as proc:
        token = _shared.set(proc)
        try:
            yield proc
        finally:
            _shared.reset(token)


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus-level METEOR 1.5 (0-1): in the `shared_meteor()` JVM, else in a short-lived one."""
    proc = _shared.get()
    if proc is not None:
        return proc.score(hyps, refs)[0]
    with MeteorProcess() as proc:
        return proc.score(hyps, refs)[0]


def _clean(text: str) -> str:
    # "|||" separates fields and a newline ends the command: neither may appear in a text.
    # (pycocoevalcap strips "|||" from the hypothesis only; doing both is harmless.)
    return " ".join(text.replace("|||", "").split())
