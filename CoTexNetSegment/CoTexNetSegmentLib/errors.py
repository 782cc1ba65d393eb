"""The one way Slicer-side code turns an exception into the text a user reads."""


def formatError(error: BaseException) -> str:
    """Engine errors and ``ValueError`` carry messages meant for users and are shown as they are; anything
    else also says what kind of error it is. Multi-line messages (a process's output) are kept whole."""
    from cotexnet.errors import CoTexNetError

    if isinstance(error, (CoTexNetError, ValueError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
