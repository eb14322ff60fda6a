"""Read the plain-text formats of e2e-metrics' measure_scores.py.

* system outputs: one hypothesis per line (a blank line is an empty output);
* references: the references of one item on consecutive lines, one blank line
  between items. As in e2e-metrics, a file with no blank line at all is read as one
  reference per item.
Lines are stripped of surrounding whitespace, as e2e-metrics does.
"""

from pathlib import Path


def read_hyps(path: str | Path) -> list[str]:
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file, expected one hypothesis per line")
    return lines


def read_refs(path: str | Path) -> list[list[str]]:
    lines = _read_lines(path)
    while lines and not lines[-1]:  # blank lines at the very end separate nothing
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: no references, expected reference lines with a blank line between items")
    if "" not in lines:
        return [[line] for line in lines]
    items: list[list[str]] = [[]]
    for lineno, line in enumerate(lines, start=1):
        if line:
            items[-1].append(line)
        elif items[-1]:
            items.append([])
        else:
            where = "at the start of the file" if lineno == 1 else "right after another blank line"
            raise ValueError(f"{path}:{lineno}: blank line {where}; items must be separated by exactly one blank line")
    return items


def _read_lines(path: str | Path) -> list[str]:
    data = Path(path).read_bytes()
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":  # final newline (or empty file)
        raw_lines.pop()
    lines = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # byte-order mark from some editors
        lines.append(text.strip())
    return lines
