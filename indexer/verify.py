"""Reading an indexed file back only while it is still the file that was
indexed: same size and same SHA-256 as its row. A file replaced since (by a
symlink to /etc/passwd, another image, a FIFO) is refused, never handed out."""

from __future__ import annotations

import hashlib
import os
import stat


class FileChanged(Exception):
    """The file at an indexed path is no longer what was indexed there."""


def read_if_unchanged(path: str, size: int, sha256: str) -> bytes:
    """The bytes of ``path`` when they are exactly what was indexed (``size``
    bytes hashing to ``sha256``); raises :class:`FileChanged` otherwise.

    The file is opened once (non-blocking, so a FIFO cannot hang the caller)
    and checked through that descriptor, so what is checked is what is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileChanged("the file is gone") from None
    except OSError as exc:
        raise FileChanged(f"the file cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileChanged("it is no longer a regular file")
        if st.st_size != size:
            raise FileChanged(f"its size changed ({st.st_size} bytes, {size} indexed)")
        chunks, got = [], 0
        while got <= size:
            piece = os.read(fd, min(1 << 20, size + 1 - got))
            if not piece:
                break
            chunks.append(piece)
            got += len(piece)
    except OSError as exc:
        raise FileChanged(f"the file cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise FileChanged("its content changed")
    return data
