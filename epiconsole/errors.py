"""Errors a user can cause: they end in one clear sentence and an exit code, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, unreachable host, wrong port).

    The message is one sentence that says what is wrong and what to do; ``exit_code`` is what the
    CLI returns (2 for usage and configuration errors).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """The lab configuration is malformed: names the file, the key and what is expected."""

    def __init__(self, path: str, key: str, expected: str) -> None:
        self.path, self.key, self.expected = path, key, expected
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{key}: {expected}")
