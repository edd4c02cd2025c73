"""Build script: compiles the engine's hot path with mypyc, and the journal's framing in C.

Everything else is declared in ``pyproject.toml``. The matching loop (``engine/_engine.py``,
the book and the accounts) runs about 1.6x faster compiled (``benchmarks/RESULTS.md``), so
``pip install .`` and ``pip install -e .`` build it; the same files still run unchanged as
plain Python where the extension is absent. The journal frames records in C
(``engine/journal/_framing.c``: 14x faster than the same function in Python, which
``engine/journal/_log.py`` keeps for where it is not built). ``KABONI_PURE_PYTHON=1`` skips
both.
"""

import os

from setuptools import Extension, setup

COMPILED = ["engine/_book.py", "engine/_accounts.py", "engine/_engine.py", "engine/_replay.py"]


def ext_modules() -> list:
    if os.environ.get("KABONI_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    framing = Extension("engine.journal._framing", ["engine/journal/_framing.c"])
    return [*mypycify(COMPILED, opt_level="3"), framing]


setup(ext_modules=ext_modules())
