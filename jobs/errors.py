"""Errors the user can fix. The CLI turns `InputError` into one line on stderr and exit code 2;
anything else is an internal failure (exit 1)."""


class InputError(Exception):
    """Bad input or config: the message names the file, column or field and what was expected."""
