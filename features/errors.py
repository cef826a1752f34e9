"""The error type every package raises for problems a user can fix (bad input, bad settings).

The CLI prints these as one line naming the problem, with a non-zero exit and no traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input or configuration; the message names file/field/value."""
