"""PTB tokenization exactly as the MS-COCO caption scripts (and so e2e-metrics) do it.

COCOEvalCap runs Stanford's PTBTokenizer with `-preserveLines -lowerCase` over every
reference and system output, then drops punctuation tokens; METEOR, ROUGE-L and CIDEr
are computed on the result. We run the same jar, once for all texts.
"""

import subprocess
import tempfile
from pathlib import Path

from .java import corenlp_jar, find_java

# The list COCO uses. The bracket names are upper case while the tokenizer lower-cases
# its output, so "-lrb-" etc. survive in COCO; we keep that quirk to match its scores.
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Lower-cased, PTB-tokenized texts with COCO's punctuation removed (one per input)."""
    if not texts:
        return []
    # One text per line: any line break inside a text would shift every later line.
    lines = [" ".join(text.split()) for text in texts]
    with tempfile.TemporaryDirectory(prefix="prefixtune-ptb-") as tmp:
        path = Path(tmp) / "input.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        cmd = [
            find_java(), "-cp", str(corenlp_jar()), "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(path),
        ]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"PTBTokenizer (java) failed with exit code {done.returncode}: {_tail(done.stderr)}")
    out = done.stdout.decode("utf-8").split("\n")
    # The tokenizer ends its output with a newline, so the tail is empty strings only.
    if len(out) < len(lines) or any(extra.strip() for extra in out[len(lines):]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} texts")
    return [" ".join(tok for tok in line.split() if tok not in COCO_PUNCTUATION) for line in out[: len(lines)]]


def _tail(raw: bytes, limit: int = 2000) -> str:
    return raw.decode("utf-8", errors="replace")[-limit:].strip()
