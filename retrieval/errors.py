"""Typed errors. Each message says what went wrong and how to fix it; the CLI
turns them into one-line messages and exit codes."""

import errno


class XmrError(Exception):
    """Base class of every error xmr raises on purpose."""


class IndexNotFound(XmrError):
    pass


class IndexUnusable(XmrError):
    """The index folder or its database cannot be created or read."""


class ClusterUnavailable(XmrError):
    """Indexing on a Ray cluster was asked for, and Ray or the cluster is missing,
    or the model cannot be rebuilt on the cluster's workers."""


def database_error_detail(exc: Exception) -> str:
    """The database's own words in an SQLAlchemy DatabaseError ("file is not a database")."""
    orig = getattr(exc, "orig", None)
    return str(orig) if orig is not None else str(exc).splitlines()[0]


def database_error_advice(detail: str) -> str:
    """What to do about a database error, from SQLite's words."""
    low = detail.lower()
    if "disk is full" in low or "disk i/o" in low:
        return ("the disk holding the index is full or failing: free some space and run the command again "
                "(what was committed is kept; the interrupted batch was not written)")
    if "readonly" in low or "read-only" in low:
        return "the index is read-only for you: check the folder's permissions, or choose another with --index"
    if "locked" in low or "busy" in low:
        return "another process holds the index: wait for it to finish and run the command again"
    return ("if it is damaged, move the index folder aside and index again (your images are untouched)")


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and run the command again; nothing half-written was kept",
    errno.EDQUOT: "your disk quota is used up: free some space and run the command again",
    errno.EACCES: "permission denied: check the permissions of that file or folder (or choose another --index)",
    errno.EPERM: "operation not permitted: check the permissions of that file or folder",
    errno.EROFS: "the file system is read-only: choose a writable folder (--index DIR for the index)",
    errno.EIO: "input/output error: the disk may be failing or disconnected; check it and run the command again",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError a user can cause: what happened, where, what to do."""
    what = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    advice = _OS_ADVICE.get(exc.errno or 0, "check the file or folder named and run the command again")
    return f"{what}{where}; {advice}"


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


class PathNotFound(XmrError):
    """A file or folder named to index does not exist (and nothing was indexed there)."""


class ImageUnusable(QueryError):
    """A query image that cannot be decoded; ``reason`` and ``detail`` as in
    ``indexer.decode.BadImage`` (without the file's path)."""

    def __init__(self, message: str, reason: str, detail: str = ""):
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class CheckpointError(XmrError):
    pass
