"""Input checks shared by every task, with errors that point at the offending item."""

from collections.abc import Sequence


def check_inputs(hyps: object, refs: object) -> tuple[list[str], list[list[str]]]:
    """Return hyps/refs as plain lists, or raise ValueError naming the bad item index."""
    if isinstance(hyps, str) or not isinstance(hyps, Sequence):
        raise ValueError(f"hyps must be a list of strings, got {type(hyps).__name__}")
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise ValueError(f"refs must be a list of reference lists, got {type(refs).__name__}")
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} reference lists; they must pair up one to one")
    if not hyps:
        raise ValueError("nothing to score: hyps and refs are empty")
    for i, hyp in enumerate(hyps):
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis at item {i} is {type(hyp).__name__}, not str")
    out_refs = []
    for i, item in enumerate(refs):
        # A bare string is a sequence too: catch refs=["a", "b"] instead of [["a"], ["b"]].
        if isinstance(item, str) or not isinstance(item, Sequence):
            raise ValueError(f"references at item {i} must be a list of strings, got {type(item).__name__}")
        if len(item) == 0:
            raise ValueError(f"item {i} has no references (every item needs at least one)")
        for k, ref in enumerate(item):
            if not isinstance(ref, str):
                raise ValueError(f"reference {k} at item {i} is {type(ref).__name__}, not str")
        out_refs.append(list(item))
    return list(hyps), out_refs
