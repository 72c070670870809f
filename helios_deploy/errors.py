"""Two kinds of error: a user error (bad input, one clear message, exit code 1) and everything else
(an internal bug, shown with its traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: what is wrong, what was found, what was expected, how to fix it.

    The CLI prints it without a traceback and exits 1; set HELIOS_DEPLOY_DEBUG=1 to see the traceback.
    """

    def __init__(self, what: str, *, found: str | None = None, expected: str | None = None, fix: str | None = None):
        self.what, self.found, self.expected, self.fix = what, found, expected, fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        for label, value in (("found", self.found), ("expected", self.expected), ("fix", self.fix)):
            if value:
                lines.append(f"  {label}: {value}")
        return "\n".join(lines)


class AuditError(UserError):
    """An artifact failed its audit (checker, session or parity); carries the table of failures."""

    def __init__(self, what: str, table: str, fix: str | None = None):
        self.table = table
        super().__init__(what, found="\n" + table, fix=fix)
