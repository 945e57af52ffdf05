"""Errors a user can act on: each names the file and the problem in one line."""

from __future__ import annotations

import os


class LowdoseError(Exception):
    """A problem with the user's input or output (bad file, bad argument), not a bug in lowdose."""


class CTInputError(LowdoseError, ValueError):
    """An input that is missing, unreadable, or not a CT volume in Hounsfield units."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CTOutputError(LowdoseError, OSError):
    """An output that cannot be written (unwritable folder, would overwrite the input, ...)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ServiceUnavailableError(LowdoseError):
    """A service lowdose depends on (a PACS) cannot be reached or does not answer in time."""

    def __init__(self, url: str, problem: str):
        self.url = url
        self.problem = f"{url}: {problem}"
        super().__init__(self.problem)
