"""A list kept on disk: append picklable items, read them back in order, a
batch at a time.

On a first import every file of the collection is a change; held in a Python
list, the changed files of a million photos take about 150 MB. Spooled to a
temporary file they take one chunk of memory, whatever the collection size.
"""

from __future__ import annotations

import pickle
import tempfile
from typing import Iterator


class Spool:
    def __init__(self, chunk: int = 4096):
        self._file = tempfile.TemporaryFile(prefix="xmr-spool-")
        self._chunk = chunk
        self._buffer: list = []
        self._count = 0

    def append(self, item) -> None:
        self._buffer.append(item)
        self._count += 1
        if len(self._buffer) >= self._chunk:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            pickle.dump(self._buffer, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._buffer = []

    def __len__(self) -> int:
        return self._count

    def batches(self, size: int) -> Iterator[list]:
        """The items in the order appended, in lists of ``size`` (the last may
        be shorter). Appending while reading is not supported."""
        self._flush()
        self._file.seek(0)
        out: list = []
        while True:
            try:
                chunk = pickle.load(self._file)
            except EOFError:
                break
            for item in chunk:
                out.append(item)
                if len(out) == size:
                    yield out
                    out = []
        if out:
            yield out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
