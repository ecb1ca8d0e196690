"""The errors a user can fix, and nothing else.

The CLI prints any :class:`UserError` as one line and exits with status 1;
every other exception is a bug and keeps its traceback (exit status 2). So a
module that rejects input raises one of these types, never a bare
``ValueError``: a ``ValueError`` from deep inside a library is not the user's.

Each type also derives from the built-in it used to be (``ValueError``,
``RuntimeError``, ``ArithmeticError``), so callers that caught those still do.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, exit status 1."""


class ConfigError(UserError, ValueError):
    """A flag or setting is out of range, or names something that does not exist."""
