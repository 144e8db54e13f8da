"""The one exception type a user ever sees: a problem with what they asked for."""


class UserError(Exception):
    """Bad input from the user: the message is one line that names the problem and the fix.

    Front ends print it to stderr and exit with code 2, without a traceback.
    """
