"""The one exception type for mistakes a user can fix (bad input, wrong settings, missing files).

Its message is one sentence: what is wrong and what to do. The CLI turns it into exit status 2
without a traceback; the notebook shows it beside the widget that caused it. Anything else is a bug.
"""


class UserError(ValueError):
    """A problem with the user's input or settings; the message says how to fix it."""
