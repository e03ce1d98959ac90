"""The one exception type that reaches users as a one-line message (the CLI prints it).

Library messages name a parameter as `name` (backticks, the keyword argument's spelling); the CLI
shows the same message with the flag instead (``cli.common.with_flags``: `batch_sizes` ->
--batch-sizes), so both audiences read the name they typed.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to fix it."""
