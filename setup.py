"""Build script: compiles the engine's hot path with mypyc.

Everything else is declared in ``pyproject.toml``. The matching loop (``engine/_engine.py``,
the book and the accounts) runs about 1.6x faster compiled (``benchmarks/RESULTS.md``), so
``pip install .`` and ``pip install -e .`` build it; the same files still run unchanged as
plain Python where the extension is absent. ``KABONI_PURE_PYTHON=1`` skips the compilation.
"""

import os

from setuptools import setup

COMPILED = ["engine/_book.py", "engine/_accounts.py", "engine/_engine.py", "engine/_replay.py"]


def ext_modules() -> list:
    if os.environ.get("KABONI_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    return mypycify(COMPILED, opt_level="3")


setup(ext_modules=ext_modules())
