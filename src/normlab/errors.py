"""The one exception type the command line turns into a one-line message."""
import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Text that prints as one line: newlines and other control characters (which a file or
    directory name may hold) shown escaped, as repr() would."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


class NormlabError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The CLI prints it as a single line and exits with code 2; it never reaches the
    user as a traceback. Its text is always one line (see one_line).
    """

    def __str__(self) -> str:
        return one_line(super().__str__())
