"""The one exception type users see: its message is printed as a single line by the CLI."""


class QoqoptError(Exception):
    """A user-facing failure (bad input, missing file, unsupported model).

    The CLI prints ``error: <message>`` on one line and exits with status 2; anything else
    escaping is a bug and keeps its traceback.
    """
