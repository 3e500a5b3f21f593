"""The one exception type users see: the CLI prints it as a single line and exits 2."""


class TiedlmError(Exception):
    """A problem with the user's input (a file, an option, a checkpoint), not a bug.

    The message names the file or option and says what is wrong, on one line.
    """
