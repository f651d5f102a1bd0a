"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


# Failures of the machine rather than of the input that a command can still name in one line.
_SPACE = "free space or choose an output folder on a disk with room"
_ACCESS = "check the path and its permissions"
_NAMED_OS_ERRORS = {
    28: ("no space left on device", _SPACE),  # ENOSPC
    122: ("disk quota exceeded", _SPACE),  # EDQUOT
    27: ("file too large for this file system", _SPACE),  # EFBIG
    30: ("read-only file system", _ACCESS),  # EROFS
    13: ("permission denied", _ACCESS),  # EACCES
    1: ("operation not permitted", _ACCESS),  # EPERM
    36: ("file name too long", "choose a shorter path"),  # ENAMETOOLONG
}


def describe_os_error(exc: BaseException) -> str | None:
    """One line for an OSError that a user can act on, or for a full disk reported by a native writer
    (safetensors' SafetensorError, torch's RuntimeError: only their message says ENOSPC); None for
    anything else, which stays a traceback (a bug to report). Libraries that wrap the error (optimum's
    "post-processing of the ONNX export failed") are seen through: the chain of causes is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        named = _describe_one(exc)
        if named is not None:
            return named
        exc = exc.__cause__ or exc.__context__
    return None


def _describe_one(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno in _NAMED_OS_ERRORS:
        what, advice = _NAMED_OS_ERRORS[exc.errno]
        return f"{what}{f' ({exc.filename})' if exc.filename else ''}: {advice}"
    if isinstance(exc, Exception) and ("No space left on device" in str(exc) or "os error 28" in str(exc)):
        return f"no space left on device: {_SPACE}"
    return None
