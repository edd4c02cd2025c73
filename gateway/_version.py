"""The installed distribution's version: one answer for ``kaboni --version`` and the
``kaboni_build_info`` metric (kept apart so that the CLI can ask without importing the server)."""

from __future__ import annotations

__all__ = ["installed_version"]


def installed_version() -> str:
    """'unknown (not installed)' when running from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaboni")
    except PackageNotFoundError:
        return "unknown (not installed)"
