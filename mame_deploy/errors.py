"""The one exception type that reaches users as a one-line message (the CLI prints it)."""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to fix it."""
