"""Errors meant for a person, not a traceback.

Raise `UserError` where a problem is found, with a message that names the file, line or key and says what to do.
`finetune.cli` catches it once, prints the message and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: a recipe key, a data record, a path, an adapter that does not fit its base."""

    exit_code = 2


class WontFitError(UserError):
    """The memory estimate says the run cannot fit the GPU; training refuses to start without --force."""

    exit_code = 3


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest valid names, or '' when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
