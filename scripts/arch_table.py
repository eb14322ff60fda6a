"""The README's supported-architecture table, generated from `prefixtune.architectures.ARCHITECTURES`.

    python scripts/arch_table.py           # print the table
    python scripts/arch_table.py --write   # replace the table in README.md (between the markers)
    python scripts/arch_table.py --check   # exit 1 when README.md differs (tests/test_architectures.py does this)

What each row is verified for is what tests/test_architectures.py runs on every accepted row, under
every attention implementation listed (tiny seeded random models; real models where a row's notes say).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- arch-table:start (scripts/arch_table.py) -->", "<!-- arch-table:end -->"


def _positions(arch) -> str:
    if arch.relative_bias:
        return "relative bias: prefix columns get the bias of text right before the input"
    if arch.position_modules:
        return "counted by the model: shifted by the prefix length (forward hook)"
    if arch.shift_positions:
        return "`position_ids` start after the prefix"
    return "none"


def _verified(arch) -> str:
    if arch.refused:
        return f"**refused** at attach (probe): {arch.refused}"
    if arch.modality == "image":
        return ("images (`tests/test_vision.py`): VPT-shallow ≡ the encoder on [CLS, prompts, patches], VPT-deep ≡ a "
                "layer loop, key/value prompt ≡ masked prompt tokens, batch ≡ rows")
    if arch.modality == "image-text":
        return ("`tests/test_vision_clip.py`: CoOp/CoCoOp/DAPL context from word embeddings ≡ the words written in "
                "the prompt, batch of classes ≡ one by one")
    if arch.encoder_only:
        return "text ≡ text (masked), left-padded batch ≡ rows"
    if len(arch.attention) > 1:
        return "text ≡ text (decoder), generate ≡ no-cache, right-padded batch ≡ rows"
    return "text ≡ text, generate ≡ no-cache, left-padded batch ≡ rows"


LEGEND = """\
Verified in CI for every accepted row under each attention implementation listed
(`tests/test_architectures.py`, tiny seeded random models, ≤1e-4): **text ≡ text**: a prefix made from
text T gives the logits of T written before the input (for encoder-decoders on the decoder side; for
bidirectional encoders the hidden states of T written before the input with T's tokens masked from the
input, which is what a prefix is); **generate ≡ no-cache**: greedy `generate()` gives the tokens and
per-step logits of a loop that re-runs the whole forward pass per token; **batch ≡ rows**: a padded
3-row batch with 3 prefixes of different lengths gives each row's logits (and greedy tokens) alone.
Encoder-decoder inputs are right-padded because BART-family encoders count positions from the first
column, which makes left padding inexact even without a prefix. Sliding windows are set shorter than
prefix + input in these tests."""


def render() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from prefixtune.architectures import ARCHITECTURES

    lines = ["| `model_type` | prefix kinds | positions | attention | verified in CI | notes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, arch in sorted(ARCHITECTURES.items(), key=lambda item: (item[1].refused is not None, item[0])):
        kinds = ", ".join(arch.attention) + (" (bidirectional)" if arch.encoder_only else "")
        impls = ", ".join(arch.impls) if not arch.refused else "—"
        lines.append(f"| `{name}` | {kinds} | {_positions(arch)} | {impls} | {_verified(arch)} | {arch.notes} |")
    accepted = sum(a.refused is None for a in ARCHITECTURES.values())
    return "\n".join([START, f"{accepted} accepted architectures, {len(ARCHITECTURES) - accepted} refused with a reason. "
                      + LEGEND, "", *lines, END])


def current() -> str:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} block")
    return text[text.index(START): text.index(END) + len(END)]


def main(argv: list[str]) -> int:
    table = render()
    if "--check" in argv:
        if current() != table:
            print("README.md's architecture table is out of date: run python scripts/arch_table.py --write")
            return 1
        return 0
    if "--write" in argv:
        text = README.read_text()
        tmp = README.with_name(f".README.md.{os.getpid()}.tmp")
        tmp.write_text(text.replace(current(), table))
        os.replace(tmp, README)  # atomic: never a half-written README
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
