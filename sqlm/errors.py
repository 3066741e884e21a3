"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class SqlmError(Exception):
    """A problem with the user's input (recipe, data, arguments): the message names what to fix."""

    exit_code = 2
