"""Finding image files under folders, with a reason for every file skipped."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .decode import is_image_name


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, normalised
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def _utf8_ok(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _stat_file(path: str) -> FoundFile | SkippedFile:
    if not _utf8_ok(path):
        return SkippedFile(_printable(path), "non-UTF-8 file name")
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return SkippedFile(path, "broken symlink" if os.path.islink(path) else "vanished")
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return SkippedFile(path, "symlink loop")
        return SkippedFile(path, f"unreadable ({exc.strerror})")
    if not stat.S_ISREG(st.st_mode):
        return SkippedFile(path, "not a regular file")
    if not os.access(path, os.R_OK):
        return SkippedFile(path, "unreadable (permission denied)")
    return FoundFile(path, st.st_size, st.st_mtime_ns)


def scan(roots: Iterable[str | os.PathLike]) -> Iterator[FoundFile | SkippedFile]:
    """Yield every image-named file below ``roots`` (files may be given directly).

    Directory symlinks are not followed (no loops, no escaping the folder);
    file symlinks are followed. Each path is yielded once.
    """
    seen: set[str] = set()
    for root in roots:
        root = os.path.abspath(os.fspath(root))
        if os.path.isfile(root) or os.path.islink(root) and not os.path.isdir(root):
            if root not in seen:
                seen.add(root)
                yield _stat_file(root)
            continue
        if not os.path.isdir(root):
            yield SkippedFile(root, "no such file or folder")
            continue
        for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if not is_image_name(name):
                    continue
                path = os.path.join(dirpath, name)
                if path in seen:
                    continue
                seen.add(path)
                yield _stat_file(path)
