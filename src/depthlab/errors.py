"""User-facing errors.

Anything a user can cause (bad config, missing file, wrong model path) raises
`DepthlabError` with a one-line message; the CLI prints it without a traceback.
Bugs in depthlab stay ordinary exceptions so they keep their traceback.
"""


class DepthlabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(DepthlabError):
    """An invalid configuration value: the message names the field and the rule."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for
    one-line errors that wrap a library's multi-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
