"""The project's error base: what a user can act on, as opposed to a bug.

Raise a subclass of `VtagError` for bad input, a missing or changed object, a refused request: the `vtag`
command prints its first line and exits 2, and an Airflow task fails with that line on top of its log.
Anything else is a bug and keeps its traceback. Errors that used to be ValueErrors keep that base too,
so `except ValueError` in callers still catches them.
"""


class VtagError(Exception):
    """A problem the user can act on; its message names the file, record or parameter, in one line."""


class UsageError(VtagError, ValueError):
    """A parameter or setting out of its range (names the parameter and what it accepts)."""
