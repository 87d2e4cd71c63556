"""Typed errors. Each message says what went wrong and how to fix it; the CLI
turns them into one-line messages and exit codes."""


class XmrError(Exception):
    """Base class of every error xmr raises on purpose."""


class IndexNotFound(XmrError):
    pass


class IndexUnusable(XmrError):
    """The index folder or its database cannot be created or read."""


def database_error_detail(exc: Exception) -> str:
    """SQLite's own words in an SQLAlchemy DatabaseError ("file is not a database")."""
    orig = getattr(exc, "orig", None)
    return str(orig) if orig is not None else str(exc).splitlines()[0]


class ModelMismatch(XmrError):
    pass


class IndexNeedsUpgrade(ModelMismatch):
    """The index was built with an earlier version of its model whose image
    side is unchanged: ``xmr upgrade`` brings it up to date in place."""


class UnknownModel(XmrError):
    pass


class DatasetError(XmrError):
    pass


class CaptionFileError(XmrError):
    pass


class QueryError(XmrError):
    pass


class ImageUnusable(QueryError):
    """A query image that cannot be decoded; ``reason`` and ``detail`` as in
    ``indexer.decode.BadImage`` (without the file's path)."""

    def __init__(self, message: str, reason: str, detail: str = ""):
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class CheckpointError(XmrError):
    pass
