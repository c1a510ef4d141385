"""The CLI's error convention, shared by every command (see shim/cli.py)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """A mistake in what the user asked (exit 2). Message: what, which value, what was expected.
    Raise it from any command; main() prints `shim <command>: <message>` and exits 2."""

    exit_code = EXIT_USAGE


class Failure(Exception):
    """The command was fine but the work failed (exit 1): a service unreachable, a request refused."""

    exit_code = EXIT_FAILURE
