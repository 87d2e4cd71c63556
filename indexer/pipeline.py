"""One indexing run: scan -> detect changes -> decode on worker threads ->
embed full batches -> write rows and vectors together.

The embedding model is handed in as ``embed(list_of_prepared) -> (vectors,
tokens_or_None)`` with ``prepare(PIL image) -> model input``; this package
knows nothing of models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .decode import BadImage, decode_image
from .store import Store
from .tokens import TokenStore
from .walk import FoundFile, SkippedFile, normalise_roots, scan, stat_file

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def to_dict(self) -> dict:
        return {
            "added": self.added, "updated": self.updated, "moved": self.moved, "unchanged": self.unchanged,
            "removed": self.removed, "skipped": dict(self.skipped), "seconds": round(self.seconds, 3),
        }


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Work:
    found: FoundFile
    sha256: str
    replaces: int | None  # id of the row at the same path, if any


class Indexer:
    def __init__(self, store: Store, prepare: Callable, embed: Callable, batch_size: int = 64,
                 threads: int | None = None, draft_size: int | None = None, tokens: TokenStore | None = None,
                 bias: Callable | None = None):
        self.store = store
        self.bias = bias  # vectors -> per-item score bias stored with each row, if the model has one
        self.tokens = tokens
        self.prepare = prepare
        self.embed = embed
        self.batch_size = batch_size
        self.threads = threads or min(8, (os.cpu_count() or 2) * 2)
        self.draft_size = draft_size

    def run(self, roots: Iterable[str], on_skip: Callable[[str, str], None] | None = None,
            progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None) -> IndexSummary:
        t0 = time.time()
        summary = IndexSummary()
        roots = normalise_roots(roots)

        def skip(path: str, reason: str) -> None:
            summary.skipped[reason] += 1
            summary.skipped_files.append((path, reason))
            if on_skip:
                on_skip(path, reason)

        # Compare the walk with the store a chunk of files at a time, so that
        # memory follows the changes, not the size of the collection.
        changed: list[tuple[FoundFile, tuple | None]] = []
        chunk: list[FoundFile] = []

        def compare(files: list[FoundFile]) -> None:
            states = self.store.states_of([f.path for f in files])
            for f in files:
                state = states.get(f.path)
                if state and state[1] == f.size and state[2] == f.mtime_ns:
                    summary.unchanged += 1
                else:
                    changed.append((f, state))

        for item in scan(roots):
            if isinstance(item, SkippedFile):
                skip(item.path, item.reason)
                continue
            chunk.append(item)
            if len(chunk) >= 2000:
                compare(chunk)
                chunk = []
        compare(chunk)
        # An indexed image is gone when its path no longer holds a file the
        # scan would index (deleted, moved away, now unreadable).
        gone_by_hash: dict[str, list[int]] = {}
        gone: list[int] = []
        for image_id, path, sha in self.store.iter_rows_under(roots):
            if not isinstance(stat_file(path), FoundFile):
                gone.append(image_id)
                gone_by_hash.setdefault(sha, []).append(image_id)

        # Hash the changed files: a hash that a vanished row had is a move.
        moved, touched, work = [], [], []
        reused: set[int] = set()
        with ThreadPoolExecutor(self.threads) as pool:
            hashes = list(pool.map(_safe_hash, [f.path for f, _ in changed]))
        for (f, state), sha in zip(changed, hashes):
            if isinstance(sha, BadImage):
                skip(f.path, sha.reason)
                continue
            if state and state[3] == sha:
                touched.append((state[0], f.size, f.mtime_ns))
                continue
            donors = [i for i in gone_by_hash.get(sha, []) if i not in reused]
            if donors and not state:
                reused.add(donors[0])
                moved.append((donors[0], f.path, f.size, f.mtime_ns))
                continue
            work.append(_Work(f, sha, state[0] if state else None))
        removed = [i for i in gone if i not in reused]
        self.store.write_images([], moved, touched, removed)
        summary.moved, summary.removed = len(moved), len(removed)
        if on_total:
            on_total(len(work))

        # Decode on worker threads (one batch ahead of the model), embed and
        # write full batches.
        chunks = [work[s : s + self.batch_size] for s in range(0, len(work), self.batch_size)]
        with ThreadPoolExecutor(self.threads) as pool:
            pending = [pool.submit(self._decode, w) for w in chunks[0]] if chunks else []
            for n, chunk in enumerate(chunks):
                decoded = [f.result() for f in pending]
                if n + 1 < len(chunks):
                    pending = [pool.submit(self._decode, w) for w in chunks[n + 1]]
                ok = [(w, d) for w, d in zip(chunk, decoded) if not isinstance(d, BadImage)]
                for w, d in zip(chunk, decoded):
                    if isinstance(d, BadImage):
                        skip(w.found.path, d.reason)
                if ok:
                    vectors, tokens = self.embed([d[0] for _, d in ok])
                    # tokens reach disk before the rows that point at them
                    slots = self.tokens.append(tokens) if tokens is not None and self.tokens else None
                    biases = self.bias(vectors) if self.bias is not None else None
                    rows = []
                    for j, (w, (_, width, height)) in enumerate(ok):
                        rows.append({
                            "path": w.found.path, "size": w.found.size, "mtime_ns": w.found.mtime_ns,
                            "sha256": w.sha256, "width": width, "height": height,
                            "embedding": vectors[j], "token_slot": None if slots is None else slots[j],
                            "bias": None if biases is None else float(biases[j]),
                        })
                    self.store.write_images(rows, [], [], [])
                    for w, _ in ok:
                        if w.replaces is None:
                            summary.added += 1
                        else:
                            summary.updated += 1
                if progress:
                    progress(len(chunk))
        summary.seconds = time.time() - t0
        return summary

    def _decode(self, w: _Work):
        try:
            d = decode_image(w.found.path, self.draft_size)
            return self.prepare(d.image), d.width, d.height
        except BadImage as exc:
            return exc
        except Exception as exc:  # a decoder bug must not stop the run
            return BadImage("corrupt", f"{type(exc).__name__}: {exc}")


def _safe_hash(path: str):
    try:
        return file_sha256(path)
    except OSError as exc:
        return BadImage("unreadable", exc.strerror or str(exc))
