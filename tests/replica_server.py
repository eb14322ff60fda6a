"""`prefixtune serve` for the multi-replica tests, with one fault-injection hook.

PREFIXTUNE_TEST_PAUSE_UPLOAD=PATH: an upload whose file name starts with "slow" stops right after
its file is written into the store folder (its content lock held, its row not committed), writes
PATH, and waits there to be killed.
"""

import os
import sys
import time
from pathlib import Path

marker = os.environ.get("PREFIXTUNE_TEST_PAUSE_UPLOAD")
if marker:
    from prefixtune.serve.store import PrefixStore

    validate = PrefixStore._validate

    def paused(self, file, label):
        if label.startswith("slow"):
            Path(marker).write_text(file.name)
            time.sleep(3600)
        return validate(self, file, label)

    PrefixStore._validate = paused

from prefixtune.cli import main  # noqa: E402

sys.argv = ["prefixtune", "serve", *sys.argv[1:]]
main()
