"""Locate the Java runtime and the jars that ship inside pycocoevalcap.

METEOR 1.5 and the Stanford PTB tokenizer used by the MS-COCO caption scripts are
Java programs; pycocoevalcap 1.2 bundles both jars, so we reuse them instead of
downloading anything.
"""

import os
import shutil
from pathlib import Path

from pycocoevalcap.meteor import meteor  # pycocoevalcap is a namespace package: find it via a module
from pycocoevalcap.tokenizer import ptbtokenizer

INSTALL_HINT = "install a Java runtime (e.g. `apt-get install default-jre-headless`) or set JAVA_HOME"


class JavaMissing(RuntimeError):
    """No Java runtime: the machine lacks a program, not the code a fix (the CLI says it in one line)."""


def find_java() -> str:
    """Return the path of the `java` executable, or raise a RuntimeError naming it.

    JAVA_HOME wins over PATH so a CI image can pin a specific JRE.
    """
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise JavaMissing(f"`java` was not found on PATH (needed for METEOR / PTB tokenization); {INSTALL_HINT}")
    return found


def meteor_jar() -> Path:
    """meteor-1.5.jar, with its data/paraphrase-en.gz beside it."""
    return _existing(Path(meteor.__file__).with_name("meteor-1.5.jar"))


def corenlp_jar() -> Path:
    """stanford-corenlp-3.4.1.jar, the PTBTokenizer the COCO caption scripts run."""
    return _existing(Path(ptbtokenizer.__file__).with_name("stanford-corenlp-3.4.1.jar"))


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise RuntimeError(f"{path.name} is missing from the pycocoevalcap install (expected at {path})")
    return path
