"""The one exception type for user mistakes (bad paths, wrong flags, mismatched checkpoints).

Tools catch it and print its message on one line, exit status 2, no traceback; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""
