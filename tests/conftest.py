"""Suite-wide settings: a stale compiled engine is refused, and CI runs hypothesis derandomized.

``pip install -e .`` compiles the engine's hot modules with mypyc (and the journal's framing
from C) into extension modules next to their sources, and Python imports the extension first. After an edit to one of those
sources the extension would still run the old code, so the suite stops and says what to do.

Under ``CI`` (set by CI runners) hypothesis draws the same examples on every run, so a red
build is reproducible and never a coin toss; elsewhere every run explores new examples.
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ENGINE = Path(__file__).resolve().parent.parent / "engine"
# each extension module's source: mypyc's, and the journal's framing in C
COMPILED = [ENGINE / f"{name}.py" for name in ("_book", "_accounts", "_engine", "_replay")]
COMPILED.append(ENGINE / "journal" / "_framing.c")


def pytest_sessionstart(session: pytest.Session) -> None:
    for source in COMPILED:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            ext = source.with_name(source.stem + suffix)
            if ext.exists() and ext.stat().st_mtime < source.stat().st_mtime:
                pytest.exit(f"{ext.name} is older than {source.name}: rebuild it with `pip install -e .`"
                            f" (or delete the extension to test the pure-Python engine)", returncode=2)
