"""The one exception users see: a one-line message saying what is wrong and what to do."""


class FlexiEdgeError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""
