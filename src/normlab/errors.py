"""The one exception type the command line turns into a one-line message."""


class NormlabError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The CLI prints it as a single line and exits with code 2; it never reaches the
    user as a traceback.
    """
