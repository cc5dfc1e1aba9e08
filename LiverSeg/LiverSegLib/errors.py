"""Errors a user can fix by changing the input; the CLI prints them as one line and exits 2."""


class LiverSegInputError(Exception):
    """Bad input image, path, DICOM folder or model file: the message names the problem."""


class ModelIntegrityError(LiverSegInputError):
    """Weights that are missing, corrupted or do not match the SHA-256 of their model card."""
