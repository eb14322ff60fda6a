"""Table-to-text and summarization metrics that reproduce the official scripts.

    from prefixtune.metrics import score, read_hyps, read_refs, format_table
    print(format_table(score("e2e", read_hyps("out.txt"), read_refs("refs.txt"))))

See `tasks.py` for what each task reports and which script it matches.
"""

from .files import read_hyps, read_refs
from .table import format_table
from .tasks import TASKS, score, scorer_ready

__all__ = ["TASKS", "format_table", "read_hyps", "read_refs", "score", "scorer_ready"]
