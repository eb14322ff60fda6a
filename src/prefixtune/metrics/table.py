"""A small aligned plain-text table of scores, for CLI output and logs."""

from collections.abc import Mapping


def format_table(scores: Mapping[str, float], digits: int = 4) -> str:
    if not scores:
        raise ValueError("no scores to format")
    rows = []
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"score {name!r} is {type(value).__name__}, not a number")
        rows.append((str(name), f"{value:.{digits}f}"))
    name_width = max(len("metric"), *(len(name) for name, _ in rows))
    value_width = max(len("score"), *(len(value) for _, value in rows))
    lines = [f"{'metric':<{name_width}}  {'score':>{value_width}}", f"{'-' * name_width}  {'-' * value_width}"]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)
