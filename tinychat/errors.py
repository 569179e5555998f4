"""The one error type for user mistakes: the CLI prints its message on one line and exits with 2."""


class TinychatError(Exception):
    """Bad input from the user (a path, a file, a flag). The message says what was wrong and what to do."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying what was kept and how to go on; the CLI prints it and exits 130."""
