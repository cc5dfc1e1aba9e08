"""Errors a user can fix by changing the input; the CLI prints them as one line and exits 2."""


class LiverSegInputError(Exception):
    """Bad input image, path, DICOM folder or model file: the message names the problem."""


class ModelIntegrityError(LiverSegInputError):
    """Weights that are missing, corrupted or do not match the SHA-256 of their model card."""


def one_line(error: BaseException) -> str:
    """What a user is told of a failure, on one line: an input error's message; anything else as an
    unexpected failure with its type and the first line of its message."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, LiverSegInputError):
        return text or type(error).__name__
    return f"unexpected failure ({type(error).__name__}{': ' + text if text else ''})"
