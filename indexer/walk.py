"""Finding image files under folders, with a reason for every file skipped."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .decode import is_image_name, unsupported_photo_kind


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, normalised
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str
    folder: bool = False  # a folder that could not be listed: what lies below it is unknown, not gone


def _utf8_ok(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def stat_file(path: str) -> FoundFile | SkippedFile:
    """What the scan would make of the file at ``path``."""
    if not _utf8_ok(path):
        return SkippedFile(_printable(path), "non-UTF-8 file name")
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return SkippedFile(path, "broken symlink" if os.path.islink(path) else "vanished")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return SkippedFile(path, "symlink loop")
        return SkippedFile(path, f"unreadable ({exc.strerror})")
    if not stat.S_ISREG(st.st_mode):
        return SkippedFile(path, "not a regular file")
    if not os.access(path, os.R_OK):
        return SkippedFile(path, "unreadable (permission denied)")
    return FoundFile(path, st.st_size, st.st_mtime_ns)


def lies_below(path: str, folders: set[str]) -> bool:
    """Whether ``path`` lies below one of ``folders`` (each ancestor looked up
    in the set)."""
    if not folders:
        return False
    child, up = path, os.path.dirname(path)
    while up != child:
        if up in folders:
            return True
        child, up = up, os.path.dirname(up)
    return False


def _unlisted(exc: OSError, fallback: str) -> SkippedFile:
    """A folder ``os.walk`` could not list."""
    return SkippedFile(exc.filename or fallback, f"unreadable folder ({exc.strerror or exc})", folder=True)


def outermost(paths: Iterable[str], is_folder: Callable[[str], bool] = lambda p: True) -> list[str]:
    """``paths`` sorted, without duplicates and without those lying below
    another kept path that ``is_folder`` accepts. Each path's ancestors are
    looked up in a set, so thousands of paths (``xmr index *.jpg``) cost
    little."""
    kept: set[str] = set()
    for path in sorted(set(paths), key=len):  # parents before their children
        child, up = path, os.path.dirname(path)
        while up != child and not (up in kept and is_folder(up)):
            child, up = up, os.path.dirname(up)
        if up == child:  # reached the top without meeting a kept folder
            kept.add(path)
    return sorted(kept)


def normalise_roots(roots: Iterable[str | os.PathLike]) -> list[str]:
    """Absolute, sorted roots without duplicates or roots inside another root
    (their files are walked anyway), so that a scan meets each path once
    without remembering the paths it has met."""
    return outermost((os.path.abspath(os.fspath(r)) for r in roots), os.path.isdir)


def scan(roots: Iterable[str | os.PathLike], recursive: bool = True) -> Iterator[FoundFile | SkippedFile]:
    """Yield every image-named file below ``roots`` (files may be given directly).

    Directory symlinks are not followed (no loops, no escaping the folder);
    file symlinks are followed. Each path is yielded once, and nothing of the
    size of the collection is held in memory. A folder that cannot be listed
    (no permission, a failing disk) is yielded as a :class:`SkippedFile` with
    ``folder=True``: its files are unknown, not gone. With ``recursive``
    False, only the files directly in each root folder.
    """
    for root in normalise_roots(roots):
        if os.path.isfile(root) or os.path.islink(root) and not os.path.isdir(root):
            yield stat_file(root)
            continue
        if not os.path.isdir(root):
            yield SkippedFile(root, "no such file or folder", folder=True)
            continue
        unlistable: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable.append, followlinks=False):
            while unlistable:
                yield _unlisted(unlistable.pop(), dirpath)
            dirnames.sort()
            if not recursive:
                dirnames.clear()
            for name in sorted(filenames):
                if is_image_name(name):
                    yield stat_file(os.path.join(dirpath, name))
                elif (kind := unsupported_photo_kind(name)) is not None:
                    yield SkippedFile(os.path.join(dirpath, name), f"unsupported format ({kind})")
        while unlistable:  # the root itself, or the last folder walked
            yield _unlisted(unlistable.pop(), root)


@dataclass(frozen=True)
class ScanUnit:
    """A part of a scan that can run on its own (another process or machine)."""
    path: str
    recursive: bool


def scan_units(roots: Iterable[str | os.PathLike]) -> list[ScanUnit]:
    """Split the scan of ``roots`` into units, each a root folder's own files
    or one of its subfolders' trees, such that scanning the units one after
    the other yields exactly what :func:`scan` yields, in the same order.
    Lists only the top level of each root."""
    units = []
    for root in normalise_roots(roots):
        try:
            if not os.path.isdir(root) or os.path.islink(root):
                raise NotADirectoryError(root)
            with os.scandir(root) as entries:
                subfolders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:  # a file, missing or unlistable: one unit that scan() reports as it would
            units.append(ScanUnit(root, True))
            continue
        units.append(ScanUnit(root, False))
        units.extend(ScanUnit(os.path.join(root, name), True) for name in subfolders)
    return units
