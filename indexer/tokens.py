"""The region-token store: one append-only file of fp16 token matrices, read
through a memory map, so a query reranks its top K without opening image
files or loading tokens into Python objects.

Layout: ``tokens.f16`` holds slot after slot, each ``tokens x width`` fp16
values; ``tokens.f16.crc`` holds one CRC-32 per slot (little-endian uint32),
so a slot that was zeroed, truncated or overwritten is caught when it is read
(:class:`TokenStoreDamaged`); ``tokens.json`` records the shape and the size
and mtime of the file when it was last verified whole. SQLite keeps each
image's slot. Writes go to the file (flushed and fsynced) before the rows that
point to them are committed, so a killed run leaves at most unreferenced
slots, never a row pointing at missing data. Slots of removed or re-embedded
images are not reused; :meth:`TokenStore.compact_into` copies the live slots
into a fresh file, which the index then switches to (``retrieval.engine``: the
file's name and the new slots change in one SQLite transaction, so a reader
never pairs slots with the wrong file).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_FILE = "tokens.f16"
SUMS_SUFFIX = ".crc"
META_FILE = "tokens.json"
_CRC = np.dtype("<u4")


class TokenStoreDamaged(Exception):
    """Slots of the token file are missing or do not match their checksums.
    ``slots`` lists them; ``xmr index`` embeds their images again."""

    def __init__(self, path: Path, slots: list[int], reason: str):
        super().__init__(f"{path}: {reason} ({len(slots)} slot{'s' if len(slots) != 1 else ''})")
        self.path = path
        self.slots = slots
        self.reason = reason


class TokenShapeMismatch(Exception):
    pass


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class TokenStore:
    def __init__(self, directory: str | os.PathLike, shape: tuple[int, int], filename: str = DEFAULT_FILE):
        self.dir = Path(directory)
        self.path = self.dir / filename
        self.sums_path = self.path.with_name(self.path.name + SUMS_SUFFIX)
        self.meta_path = self.dir / META_FILE
        self.shape = tuple(int(x) for x in shape)
        self.slot_bytes = self.shape[0] * self.shape[1] * 2
        meta = self._read_meta()
        if meta is not None:
            if tuple(meta["shape"]) != self.shape:
                raise TokenShapeMismatch(f"{self.meta_path}: token shape {tuple(meta['shape'])}, expected {self.shape}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_meta({})
        self._map = None
        self._map_slots = 0
        # slots found matching their checksums, while the file keeps this (size, mtime)
        self._checked: set[int] = set()
        self._checked_stat: tuple[int, int] | None = None

    # -- the sidecar ------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        """tokens.json, or None when there is none. A damaged one (not JSON, no
        shape) is rewritten: the shape is the model's, and every slot is
        checked against its checksum anyway."""
        try:
            meta = json.loads(self.meta_path.read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or len(meta["shape"]) != 2:
                raise ValueError("no token shape in it")
            return meta
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("%s is damaged (%s); written again with the model's token shape %s",
                        self.meta_path, exc, self.shape)
            self._write_meta({})
            return {"shape": list(self.shape)}

    def _write_meta(self, extra: dict) -> None:
        tmp = self.meta_path.with_name(f"{self.meta_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"shape": list(self.shape), "dtype": "float16", **extra}))
            os.replace(tmp, self.meta_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _file_stat(self) -> list | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return [self.path.name, st.st_size, st.st_mtime_ns]

    def _verified(self) -> bool:
        """Whether the file is as it was when last verified whole."""
        meta = self._read_meta() or {}
        return meta.get("verified") is not None and meta.get("verified") == self._file_stat()

    def _mark_verified(self) -> None:
        try:
            self._write_meta({"verified": self._file_stat()})
        except OSError as exc:  # housekeeping: the next run verifies again
            log.debug("token store verification not recorded: %s", exc)

    # -- slots ------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return self.path.stat().st_size // self.slot_bytes if self.path.exists() else 0

    def _n_sums(self) -> int:
        return self.sums_path.stat().st_size // _CRC.itemsize if self.sums_path.exists() else 0

    def _sums_of(self, fd: int, first: int, last: int, chunk: int = 256) -> bytes:
        """Checksums of slots [first, last) of the open file ``fd``."""
        out = []
        for s in range(first, last, chunk):
            n = min(chunk, last - s)
            data = os.pread(fd, n * self.slot_bytes, s * self.slot_bytes)
            out += [_crc(data[i * self.slot_bytes : (i + 1) * self.slot_bytes]) for i in range(n)]
        return np.asarray(out, _CRC).tobytes()

    def ensure_sums(self) -> int:
        """Give every whole slot of the file a checksum (an index written before
        checksums existed gets them from its data as it is, once); drop
        checksums past the file's end. Returns the checksums computed."""
        n, have = self.n_slots, self._n_sums()
        if have == n:
            return 0
        with open(self.sums_path, "ab") as sums:
            if have > n:
                sums.truncate(n * _CRC.itemsize)
                return 0
            sums.truncate(have * _CRC.itemsize)
            with open(self.path, "rb") as src:
                sums.write(self._sums_of(src.fileno(), have, n))
            sums.flush()
            os.fsync(sums.fileno())
        return n - have

    def append(self, tokens: np.ndarray) -> list[int]:
        """Write ``[n, tokens, width]`` matrices and their checksums; returns
        their slots. On an error (a full disk) the file is cut back to what it
        held before, and the error raised."""
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        if tokens.shape[1:] != self.shape:
            raise ValueError(f"tokens of shape {tokens.shape[1:]}, store holds {self.shape}")
        was_verified = self._verified()
        with open(self.path, "ab") as f:
            size = f.seek(0, os.SEEK_END)
            if size % self.slot_bytes:  # a torn write of a killed run: skip to the next whole slot
                f.truncate(size - size % self.slot_bytes)
                size -= size % self.slot_bytes
            first = size // self.slot_bytes
            try:
                self.ensure_sums()
                data = tokens.tobytes()
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                crcs = np.asarray([_crc(data[i * self.slot_bytes : (i + 1) * self.slot_bytes])
                                   for i in range(len(tokens))], _CRC).tobytes()
                with open(self.sums_path, "ab") as sums:
                    sums.write(crcs)
                    sums.flush()
                    os.fsync(sums.fileno())
            except BaseException:
                _cut(self.path, size)
                _cut(self.sums_path, first * _CRC.itemsize)
                raise
        if was_verified:
            self._mark_verified()
        return list(range(first, first + len(tokens)))

    def get(self, slots: Iterable[int]) -> np.ndarray:
        """``[len(slots), tokens, width]`` fp16 (a copy), each slot checked
        against its checksum; raises :class:`TokenStoreDamaged`."""
        slots = np.asarray(list(slots), dtype=np.int64)
        if len(slots) == 0:
            return np.zeros((0,) + self.shape, np.float16)
        if self._map is None or slots.max() >= self._map_slots:
            n = self.n_slots
            if slots.max() >= n:
                beyond = sorted(int(s) for s in slots if s >= n)
                raise TokenStoreDamaged(self.path, beyond, f"slots beyond the {n} the file holds")
            self._map = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n,) + self.shape)
            self._map_slots = n
        out = np.array(self._map[slots])
        bad = self._mismatched(slots, out)
        if bad:
            raise TokenStoreDamaged(self.path, bad, "slots that do not match their checksums")
        return out

    def _mismatched(self, slots: np.ndarray, arrays: np.ndarray) -> list[int]:
        """Slots among ``slots`` (read as ``arrays``) that fail their checksums.
        A slot that passed is not hashed again while the file is unchanged
        (a server reads the same slots over and over)."""
        st = self.path.stat()
        if (st.st_size, st.st_mtime_ns) != self._checked_stat:
            self._checked, self._checked_stat = set(), (st.st_size, st.st_mtime_ns)
        n_sums = self._n_sums()
        # slots written before checksums existed have none yet
        todo = [j for j, s in enumerate(slots) if s < n_sums and int(s) not in self._checked]
        if not todo:
            return []
        with open(self.sums_path, "rb") as f:
            fd = f.fileno()
            want = [int.from_bytes(os.pread(fd, 4, int(slots[j]) * 4), "little") for j in todo]
        bad = []
        for j, w in zip(todo, want):
            if _crc(arrays[j].tobytes()) == w:
                self._checked.add(int(slots[j]))
            else:
                bad.append(int(slots[j]))
        return bad

    def check(self, slots: np.ndarray) -> list[int]:
        """The ``slots`` that are damaged: past the file's end, or not matching
        their checksums. The checksums are read only when the file changed
        since it was last verified whole (its size and mtime are recorded), so
        an unchanged store costs one stat."""
        slots = np.asarray(slots, np.int64)
        n = self.n_slots
        bad = [int(s) for s in slots if s >= n]
        if self._verified():
            return bad
        inside = slots[slots < n]
        if len(inside) and self.path.exists():
            self.ensure_sums()  # every slot inside the file has its checksum from here on
            sums = np.fromfile(self.sums_path, _CRC)
            with open(self.path, "rb") as f:
                fd = f.fileno()
                bad += [int(slot) for slot in inside
                        if _crc(os.pread(fd, self.slot_bytes, int(slot) * self.slot_bytes)) != int(sums[slot])]
        if not bad:
            self._mark_verified()
        return sorted(bad)

    def compact_into(self, filename: str, slots, chunk: int = 256) -> "TokenStore":
        """Copy ``slots`` (in that order) into a new file ``filename`` beside
        this one, with their checksums, flushed to disk; slot ``slots[i]``
        becomes slot ``i`` there. This file is left as it is. A slot that does
        not match its checksum abandons the copy (:class:`TokenStoreDamaged`)."""
        new = TokenStore(self.dir, self.shape, filename)
        tmp = new.path.with_name(new.path.name + f".{os.getpid()}.tmp")
        stmp = new.sums_path.with_name(new.sums_path.name + f".{os.getpid()}.tmp")
        self.ensure_sums()
        sums = np.fromfile(self.sums_path, _CRC) if self.sums_path.exists() else np.zeros(0, _CRC)
        try:
            # plain reads, not the memory map: a map would count every page of a
            # large file in this process's resident memory
            with open(self.path, "rb") as src, open(tmp, "wb") as dst, open(stmp, "wb") as dsums:
                fd = src.fileno()
                for s in range(0, len(slots), chunk):
                    part = [int(x) for x in slots[s : s + chunk]]
                    pieces = [os.pread(fd, self.slot_bytes, slot * self.slot_bytes) for slot in part]
                    if any(len(p) != self.slot_bytes for p in pieces):
                        raise TokenStoreDamaged(self.path, part, "a slot beyond the file's end; compaction abandoned")
                    crcs = [_crc(p) for p in pieces]
                    bad = [slot for slot, c in zip(part, crcs) if slot < len(sums) and c != int(sums[slot])]
                    if bad:
                        raise TokenStoreDamaged(self.path, bad, "slots that do not match their checksums; "
                                                                "compaction abandoned")
                    dst.write(b"".join(pieces))
                    dsums.write(np.asarray(crcs, _CRC).tobytes())
                for fh in (dst, dsums):
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(stmp, new.sums_path)
            os.replace(tmp, new.path)
        finally:
            tmp.unlink(missing_ok=True)
            stmp.unlink(missing_ok=True)
        new._mark_verified()
        return new


def _cut(path: Path, size: int) -> None:
    """Truncate ``path`` back to ``size`` bytes, if it grew (best effort)."""
    try:
        if path.exists() and path.stat().st_size > size:
            os.truncate(path, size)
    except OSError as exc:
        log.warning("could not cut %s back to %d bytes: %s", path, size, exc)
