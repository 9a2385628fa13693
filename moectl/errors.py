"""Errors a user can fix. The CLI prints them as one clear message and exits with their code."""

from __future__ import annotations

from dataclasses import dataclass


class MoectlError(Exception):
    """A failure with a message for the user (no traceback) and an exit code.

    exit code 2 = bad usage or bad input (recipe, data, arguments); 1 = runtime failure.
    """

    exit_code = 2
    # Raised by every process of a run alike (decided together, or from what all of them read):
    # then the processes leave together and only the first prints it. Otherwise the process that
    # raised it leaves at once and prints it, and the launcher stops the others.
    agreed = False

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RuntimeFailure(MoectlError):
    exit_code = 1


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe: the dotted key path, what is wrong, and where it was written."""

    path: str
    message: str
    where: str | None = None     # "file.yaml:12" or "override 'a.b=1'"
    related: str | None = None   # another key the problem involves (its origin is shown too)
    related_where: str | None = None

    def render(self) -> str:
        loc = self.path or "(top level)"
        if self.where:
            loc += f" ({self.where})"
        text = f"{loc}: {self.message}"
        if self.related and self.related_where:
            text += f" [{self.related} is set at {self.related_where}]"
        return text


class RecipeError(MoectlError):
    """All the problems found in one recipe, reported together."""

    def __init__(self, source: str, issues: list[Issue], hint: str | None = None):
        self.source = source
        self.issues = issues
        n = len(issues)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        body = "\n".join("  " + i.render() for i in issues)
        super().__init__(f"{head}\n{body}", hint=hint)
