"""The region-token store: one append-only file of fp16 token matrices, read
through a memory map, so a query reranks its top K without opening image
files or loading tokens into Python objects.

Layout: ``tokens.f16`` holds slot after slot, each ``tokens x width`` fp16
values; ``tokens.json`` records the shape. SQLite keeps each image's slot.
Writes go to the file (flushed and fsynced) before the rows that point to
them are committed, so a killed run leaves at most unreferenced slots, never a
row pointing at missing data. Slots of removed or re-embedded images are not reused; :meth:`TokenStore.compact_into`
copies the live slots into a fresh file, which the index then switches to
(``retrieval.engine``: the file's name and the new slots change in one SQLite
transaction, so a reader never pairs slots with the wrong file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


DEFAULT_FILE = "tokens.f16"


class TokenStore:
    def __init__(self, directory: str | os.PathLike, shape: tuple[int, int], filename: str = DEFAULT_FILE):
        self.dir = Path(directory)
        self.path = self.dir / filename
        self.meta_path = self.dir / "tokens.json"
        self.shape = tuple(int(x) for x in shape)
        self.slot_bytes = self.shape[0] * self.shape[1] * 2
        if self.meta_path.is_file():
            stored = tuple(json.loads(self.meta_path.read_text())["shape"])
            if stored != self.shape:
                raise ValueError(f"{self.meta_path}: token shape {stored}, expected {self.shape}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"shape": list(self.shape), "dtype": "float16"}))
            os.replace(tmp, self.meta_path)
        self._map = None
        self._map_slots = 0

    @property
    def n_slots(self) -> int:
        return self.path.stat().st_size // self.slot_bytes if self.path.exists() else 0

    def append(self, tokens: np.ndarray) -> list[int]:
        """Write ``[n, tokens, width]`` matrices; returns their slots."""
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        if tokens.shape[1:] != self.shape:
            raise ValueError(f"tokens of shape {tokens.shape[1:]}, store holds {self.shape}")
        with open(self.path, "ab") as f:
            size = f.seek(0, os.SEEK_END)
            if size % self.slot_bytes:  # a torn write of a killed run: skip to the next whole slot
                f.truncate(size - size % self.slot_bytes)
                size -= size % self.slot_bytes
            first = size // self.slot_bytes
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return list(range(first, first + len(tokens)))

    def get(self, slots) -> np.ndarray:
        """``[len(slots), tokens, width]`` fp16 (a copy)."""
        slots = np.asarray(list(slots), dtype=np.int64)
        if len(slots) == 0:
            return np.zeros((0,) + self.shape, np.float16)
        if self._map is None or slots.max() >= self._map_slots:
            n = self.n_slots
            if slots.max() >= n:
                raise KeyError(f"token slot {int(slots.max())} beyond the {n} in {self.path}")
            self._map = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n,) + self.shape)
            self._map_slots = n
        return np.array(self._map[slots])

    def compact_into(self, filename: str, slots, chunk: int = 256) -> "TokenStore":
        """Copy ``slots`` (in that order) into a new file ``filename`` beside
        this one, flushed to disk; slot ``slots[i]`` becomes slot ``i`` there.
        This file is left as it is."""
        new = TokenStore(self.dir, self.shape, filename)
        tmp = new.path.with_name(new.path.name + f".{os.getpid()}.tmp")
        # plain reads, not the memory map: a map would count every page of a
        # large file in this process's resident memory
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            fd = src.fileno()
            for s in range(0, len(slots), chunk):
                parts = [os.pread(fd, self.slot_bytes, int(slot) * self.slot_bytes) for slot in slots[s : s + chunk]]
                if any(len(p) != self.slot_bytes for p in parts):
                    raise KeyError(f"a token slot of {self.path} lies beyond its end; compaction abandoned")
                dst.write(b"".join(parts))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, new.path)
        return new
