"""Files written so that a crash never leaves half of one, and the one error for a bad artifact file.

Torch-free on purpose: the CLI, the store and the experiment records use these without paying for
importing torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PrefixFileError(ValueError):
    """An artifact file (prefix, soft prompt, weights, PEFT folder) is missing, damaged, or does not fit
    the model; the message names the file."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_file_bytes(path: str | Path) -> bytearray:
    """A file's bytes in one writable buffer of exactly its size: `prefix.parse_safetensors` makes tensors
    that view it, so a file costs its size once in memory (no copy on parse)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        n = f.readinto(buf)
        if n == size and not f.read(1):
            return buf
    # the file changed size while we read it: what was read is what is checked (a hash will differ)
    return bytearray(Path(path).read_bytes())
