"""One indexing run: scan and compare with the store -> read each changed
file once on worker threads or processes (hash; decode unless it is a move)
-> embed full batches -> write rows and vectors together.

The embedding model is handed in as ``embed(list_of_prepared) -> (vectors,
tokens_or_None)`` with ``prepare(PIL image) -> model input``; this package
knows nothing of models. Where the listing, reading and embedding run is a
*runner*'s business: :class:`LocalRunner` (threads, or worker processes that
get past the interpreter lock on many-core machines feeding a GPU) or
``ray_runner.RayRunner`` (a Ray cluster). The run's decisions (what changed,
what moved, which id a new image gets) and every write stay here, in this
process, in the scan's order, whatever the runner.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Protocol, Union

import numpy as np

from .decode import MAX_FILE_BYTES, BadImage, decode_image
from .spool import Spool
from .store import Store
from .tokens import TokenStore
from .walk import FoundFile, SkippedFile, lies_below, normalise_roots, scan, stat_file

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> files (each reported by on_skip as it goes)
    seconds: float = 0.0
    # images kept although their files are not there, because their whole
    # folder is missing, empty or unreadable (an unmounted drive, a folder
    # without permission): folder -> images. ``prune`` removes them instead.
    offline: Counter = field(default_factory=Counter)
    runner: str = "this process"  # where files were read and embedded

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def to_dict(self) -> dict:
        return {
            "added": self.added, "updated": self.updated, "moved": self.moved, "unchanged": self.unchanged,
            "removed": self.removed, "skipped": dict(self.skipped), "offline": sum(self.offline.values()),
            "offline_folders": dict(self.offline), "seconds": round(self.seconds, 3), "runner": self.runner,
        }


# Files up to this size are read into memory once, hashed and decoded from
# the same bytes; larger ones are hashed as a stream and decoded from disk.
HOLD_BYTES = 32 * 1024 * 1024


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


@dataclass
class Embedded:
    """An image already embedded where it was read (a Ray encoder actor)."""
    vector: np.ndarray
    tokens: np.ndarray | None
    width: int
    height: int


# What a runner makes of one changed file: BadImage, or (sha256, None) when it
# was not decoded (unchanged content or a move), or (sha256, (prepared, width,
# height)), or (sha256, Embedded).
Examined = Union[BadImage, tuple]
Changed = tuple  # (FoundFile, stored state (id, size, mtime_ns, sha256) or None)


class Runner(Protocol):
    """Where an indexing run lists folders and reads, decodes (and maybe
    embeds) the changed files. Each yields in the order given."""

    description: str  # in words, for the run's summary

    def listing(self, roots: list[str]) -> Iterable[FoundFile | SkippedFile]:
        ...

    def examined(self, batches: Iterator[list[Changed]],
                 gone_hashes: frozenset[str]) -> Iterator[tuple[list[Changed], list[Examined]]]:
        ...


class LocalRunner:
    """Lists in this process and reads each changed file on a worker thread
    (or, with ``processes``, in worker processes: ``prepare`` must then be
    picklable, a module-level function or a ``functools.partial`` of one),
    one batch ahead of the model."""

    def __init__(self, prepare: Callable, draft_size: int | None = None, threads: int | None = None,
                 processes: int = 0):
        self.prepare = prepare
        self.draft_size = draft_size
        self.threads = threads or min(8, (os.cpu_count() or 2) * 2)
        self.processes = processes
        self.description = (f"this process, {processes} decoding process{'es' if processes != 1 else ''}" if processes
                            else "this process")

    def listing(self, roots: list[str]) -> Iterable[FoundFile | SkippedFile]:
        return scan(roots)

    def examined(self, batches, gone_hashes):
        with self._pool(gone_hashes) as pool:
            if self.processes:
                def submit(f, st):
                    return pool.submit(_examine_in_worker, f, st, self.draft_size, self.prepare)
            else:
                def submit(f, st):
                    return pool.submit(examine, f, st, gone_hashes, self.draft_size, self.prepare)
            batch = next(batches, None)
            pending = [submit(f, st) for f, st in batch] if batch else []
            while batch is not None:
                results = [f.result() for f in pending]
                following = next(batches, None)
                if following is not None:  # decode one batch ahead of the model
                    pending = [submit(f, st) for f, st in following]
                yield batch, results
                batch = following

    def _pool(self, gone_hashes: frozenset):
        if not self.processes:
            return ThreadPoolExecutor(self.threads)
        # spawn, not fork: the parent runs model threads that a fork would copy mid-flight
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(gone_hashes,))


class Indexer:
    def __init__(self, store: Store, prepare: Callable, embed: Callable, batch_size: int = 64,
                 threads: int | None = None, draft_size: int | None = None, tokens: TokenStore | None = None,
                 bias: Callable | None = None, processes: int = 0, runner: Runner | None = None):
        self.store = store
        self.bias = bias  # vectors -> per-item score bias stored with each row, if the model has one
        self.tokens = tokens
        self.prepare = prepare
        self.embed = embed
        self.batch_size = batch_size
        self.draft_size = draft_size
        self.runner = runner or LocalRunner(prepare, draft_size, threads, processes)

    def run(self, roots: Iterable[str], on_skip: Callable[[str, str], None] | None = None,
            progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None,
            prune: bool = False, force: Iterable[str] = ()) -> IndexSummary:
        """Bring the store up to date with ``roots``. Images whose files are gone
        are removed, except where their whole folder is missing, empty or
        unreadable: those are kept and counted in ``summary.offline``, unless
        ``prune``. Files at ``force`` paths are embedded again even when
        unchanged (their region tokens were damaged)."""
        t0 = time.time()
        summary = IndexSummary(runner=self.runner.description)
        roots = normalise_roots(roots)

        def skip(path: str, reason: str) -> None:
            summary.skipped[reason] += 1
            if on_skip:
                on_skip(path, reason)

        with Spool() as changed:
            return self._run(roots, changed, skip, summary, progress, on_total, t0, prune, frozenset(force))

    def _run(self, roots, changed: Spool, skip, summary: IndexSummary, progress, on_total, t0,
             prune: bool, force: frozenset[str]) -> IndexSummary:
        # Compare the walk with the store a chunk of files at a time, and keep
        # the changed ones on disk (``changed``: (file, stored state) pairs), so
        # that memory stays flat whatever the size of the collection, even on
        # a first import where every file is a change.
        chunk: list[FoundFile] = []

        def compare(files: list[FoundFile]) -> None:
            states = self.store.states_of([f.path for f in files])
            for f in files:
                state = states.get(f.path)
                if f.path in force and state:
                    changed.append((f, (*state[:3], "")))  # no hash matches "": decoded and embedded again
                elif state and state[1] == f.size and state[2] == f.mtime_ns:
                    summary.unchanged += 1
                else:
                    changed.append((f, state))

        # folders holding image files now (listed or not), and folders that could not be listed
        seen_dirs: set[str] = set()
        unlisted: set[str] = set()
        for item in self.runner.listing(roots):
            if isinstance(item, SkippedFile):
                skip(item.path, item.reason)
                if item.folder:
                    unlisted.add(item.path)
                else:
                    seen_dirs.add(os.path.dirname(item.path))
                continue
            seen_dirs.add(os.path.dirname(item.path))
            chunk.append(item)
            if len(chunk) >= 2000:
                compare(chunk)
                chunk = []
        compare(chunk)
        # An indexed image is gone when its path no longer holds a file the
        # scan would index (deleted, moved away, now unreadable).
        # Those whose folder is missing, empty or unreadable are offline rather
        # than gone (kept unless pruned), but still lend their vector to a
        # file found elsewhere with the same content (a moved folder).
        gone_by_hash: dict[str, list[int]] = {}
        gone: list[int] = []
        offline: dict[int, str] = {}
        root_set = set(roots)
        for image_id, path, sha in self.store.iter_rows_under(roots):
            if not isinstance(stat_file(path), FoundFile):
                gone.append(image_id)
                gone_by_hash.setdefault(sha, []).append(image_id)
                folder = os.path.dirname(path)
                if not prune and path not in root_set and (folder not in seen_dirs or lies_below(path, unlisted)):
                    offline[image_id] = folder

        # Each changed file is read once by the runner: hashed, and decoded
        # from the same bytes unless its hash shows it is unchanged content
        # (touched) or a vanished image's (a move: no model work).
        if on_total:
            on_total(len(changed))
        reused: set[int] = set()
        # closed on the way out, an exception or Ctrl-C included, so that the
        # runner's workers stop now rather than when the traceback is freed
        examined = closing(self.runner.examined(changed.batches(self.batch_size), frozenset(gone_by_hash)))
        with examined as results_by_batch:
            self._write_all(results_by_batch, gone_by_hash, reused, skip, summary, progress)
        removed = [i for i in gone if i not in reused and i not in offline]
        if removed:
            self.store.write_images([], [], [], removed)
        summary.removed = len(removed)
        summary.offline.update(folder for i, folder in offline.items() if i not in reused)
        summary.seconds = time.time() - t0
        return summary


    def _write_all(self, results_by_batch, gone_by_hash: dict[str, list[int]], reused: set[int], skip,
                   summary: IndexSummary, progress) -> None:
        """Classify each batch's files (unchanged content, moved, new or
        changed, bad) and write the batch in one transaction."""
        for batch, results in results_by_batch:
            moved, touched, ok = [], [], []
            for (f, state), r in zip(batch, results):
                if isinstance(r, BadImage):
                    skip(f.path, r.reason)
                    continue
                sha, decoded = r
                if state and state[3] == sha:
                    touched.append((state[0], f.size, f.mtime_ns))
                    continue
                donors = [i for i in gone_by_hash.get(sha, []) if i not in reused]
                if donors and not state:
                    reused.add(donors[0])
                    moved.append((donors[0], f.path, f.size, f.mtime_ns))
                    continue
                if decoded is None:  # its donor went to an identical file earlier in the run
                    decoded = decode(f.path, None, self.draft_size, self.prepare)
                    if isinstance(decoded, BadImage):
                        skip(f.path, decoded.reason)
                        continue
                ok.append((_Work(f, sha, state[0] if state else None), decoded))
            rows = self._rows(ok)
            if rows or moved or touched:
                self.store.write_images(rows, moved, touched, [])
            summary.moved += len(moved)
            for w, _ in ok:
                if w.replaces is None:
                    summary.added += 1
                else:
                    summary.updated += 1
            if progress:
                progress(len(batch))

    def _rows(self, ok: list[tuple[_Work, object]]) -> list[dict]:
        """Store rows of a batch's new and changed images, embedding those the
        runner only decoded; their region tokens reach disk first."""
        if not ok:
            return []
        vectors: list = [None] * len(ok)
        tokens: list = [None] * len(ok)
        sizes, todo = [], []
        for j, (_, d) in enumerate(ok):
            if isinstance(d, Embedded):
                vectors[j], tokens[j] = d.vector, d.tokens
                sizes.append((d.width, d.height))
            else:  # (prepared, width, height): embedded here
                sizes.append((d[1], d[2]))
                todo.append(j)
        if todo:
            vecs, toks = self.embed([ok[j][1][0] for j in todo])
            for n, j in enumerate(todo):
                vectors[j], tokens[j] = vecs[n], None if toks is None else toks[n]
        vectors = np.stack(vectors).astype(np.float32, copy=False)
        with_tokens = self.tokens is not None and all(t is not None for t in tokens)
        slots = self.tokens.append(np.stack(tokens)) if with_tokens else None
        biases = self.bias(vectors) if self.bias is not None else None
        return [{
            "path": w.found.path, "size": w.found.size, "mtime_ns": w.found.mtime_ns,
            "sha256": w.sha256, "width": width, "height": height,
            "embedding": vectors[j], "token_slot": None if slots is None else slots[j],
            "bias": None if biases is None else float(biases[j]),
        } for j, ((w, _), (width, height)) in enumerate(zip(ok, sizes))]


def examine(f: FoundFile, state, gone_hashes, draft_size: int | None, prepare: Callable):
    """(sha256, decoded or None) of one changed file, read once; or BadImage.
    Not decoded when its content is unchanged or a vanished image's (a move)."""
    try:
        if f.size > MAX_FILE_BYTES:
            return BadImage("too large", f"{f.size} bytes (limit {MAX_FILE_BYTES})")
        if f.size > HOLD_BYTES:  # hashed as a stream, decoded from the file
            data, sha = None, file_sha256(f.path)
        else:
            with open(f.path, "rb") as fh:
                data = fh.read()
            sha = hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        return BadImage("vanished", "deleted while the run was reading files")
    except OSError as exc:
        return BadImage("unreadable", exc.strerror or str(exc))
    if (state and state[3] == sha) or (not state and sha in gone_hashes):
        return sha, None  # unchanged content or a move: no decoding needed
    decoded = decode(f.path, data, draft_size, prepare)
    return decoded if isinstance(decoded, BadImage) else (sha, decoded)


def decode(path: str, data: bytes | None, draft_size: int | None, prepare: Callable):
    """(prepared, width, height) of one image, or BadImage."""
    try:
        d = decode_image(path, draft_size, data)
        return prepare(d.image), d.width, d.height
    except BadImage as exc:
        return exc
    except Exception as exc:  # a decoder bug must not stop the run
        return BadImage("corrupt", f"{type(exc).__name__}: {exc}")


# In a worker process: the hashes of vanished images, sent once at start-up.
_GONE_HASHES: frozenset = frozenset()


def _init_worker(gone_hashes: frozenset) -> None:
    global _GONE_HASHES
    _GONE_HASHES = gone_hashes
    # Ctrl-C reaches the whole process group: the parent stops the run and
    # shuts the pool down; workers dying of it on their own only print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _examine_in_worker(f: FoundFile, state, draft_size: int | None, prepare: Callable):
    return examine(f, state, _GONE_HASHES, draft_size, prepare)
