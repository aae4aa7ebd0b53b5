"""Errors a user can cause: each prints as one line and makes the CLI exit with code 2."""

from __future__ import annotations


class ForgeError(Exception):
    """A mistake in a preset, a data file or a command line, described in one line.

    The CLI prints ``str(error)`` without a traceback and exits with code 2.

    Example:
        >>> raise ForgeError("data file 'train.jsonl' not found")
        Traceback (most recent call last):
        forge.errors.ForgeError: data file 'train.jsonl' not found
    """

    #: What ``forge`` exits with: 2 for a mistake the user can fix in what they gave.
    exit_code = 2


class ForgeFault(ForgeError):
    """A fault outside the user's control (a full disk), said in plain words; exit code 1.

    Example:
        >>> raise ForgeFault("disk full at outputs/run/checkpoint-40")
        Traceback (most recent call last):
        forge.errors.ForgeFault: disk full at outputs/run/checkpoint-40
    """

    exit_code = 1


class ConfigError(ForgeError):
    """One or more problems in a preset, all collected before raising.

    Args:
        problems: one line each, e.g. ``"my.yaml: training.learnig_rate: unknown key
            (did you mean 'learning_rate'?)"``.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
