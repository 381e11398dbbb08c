"""One error type for bad input, so every entry point reports it the same way."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: names the subject (when known), the file (when known) and the problem.

    The CLI turns it into a single line on stderr and exit status 2.
    """

    def __init__(self, problem: str, *, file: str | Path | None = None, subject: str | None = None):
        self.problem = problem
        self.file = None if file is None else str(file)
        self.subject = subject
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.subject:
            where.append(f"subject {self.subject}")
        if self.file:
            where.append(f"file {self.file}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.problem}" if prefix else self.problem

    def with_context(self, *, file=None, subject=None) -> "InputError":
        """A copy that fills in the file or subject an inner call did not know."""
        return InputError(self.problem, file=self.file or file, subject=self.subject or subject)
