"""`prefixtune serve` for the multi-replica tests, with one fault-injection hook.

PREFIXTUNE_TEST_PAUSE_UPLOAD=PATH: an upload whose prefix name starts with "slow" stops right after
its file is renamed into the store folder (its content lock held, its row not committed), writes
PATH, and waits there to be killed.
"""

import os
import sys
import time
from pathlib import Path

marker = os.environ.get("PREFIXTUNE_TEST_PAUSE_UPLOAD")
if marker:
    import threading

    from prefixtune.serve.store import PrefixStore

    check, real_replace, slow = PrefixStore._check_name_free, os.replace, threading.local()

    def checked(self, name, owner, public, db=None):
        # called inside the upload's transaction (db given) just before its file is renamed into place
        slow.on = db is not None and name.startswith("slow")
        return check(self, name, owner, public, db)

    def replace(src, dst):
        real_replace(src, dst)
        if getattr(slow, "on", False):
            Path(marker).write_text(os.path.basename(dst))
            time.sleep(3600)

    PrefixStore._check_name_free = checked
    os.replace = replace

from prefixtune.cli import main  # noqa: E402

sys.argv = ["prefixtune", "serve", *sys.argv[1:]]
main()
