"""An indexing run's listing, reading and embedding on a Ray cluster, as Ray
Data pipelines: folders listed in tasks, each changed file hashed and decoded
from the same bytes in a CPU task, the encoder in an actor pool (one actor
per GPU with ``num_gpus=1`` where the cluster has GPUs, CPU actors
otherwise). Rows, vectors and region tokens come back to the one process
that holds the index's writer lock and are written there in batches, in the
scan's order, so an image gets the id the single-process path gives it.

Tasks and actors only compute: a task retried after a worker died redoes its
batch, and its output reaches the writer once (Ray Data's lineage), so a
killed worker costs its in-flight batch, never a row. Ray is imported when a
:class:`RayRunner` starts, never by the rest of xmr.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .decode import BadImage
from .pipeline import Changed, Embedded, Examined, examine
from .walk import FoundFile, SkippedFile, scan, scan_units

log = logging.getLogger(__name__)

RAY_MISSING = "indexing on Ray needs the ray extra: pip install 'xmr-search[ray]'"

# Changed files handed to one Ray Data pipeline: bounds the driver's and the
# object store's share of a huge first import (each window restarts the
# encoder actors, a few seconds).
WINDOW = 20_000

DECODE_RETRIES = 5


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass
class RayOptions:
    #: a cluster's address (``HOST:6379``, ``ray://HOST:10001``), or ``local``
    #: (a Ray runtime of this machine alone); None joins the cluster RAY_ADDRESS
    #: names, else the one ``ray start`` started on this machine, else a local runtime
    address: str | None = None
    #: encoder actors; None: one per GPU, or one per 4 CPUs where there is no GPU
    encoders: int | None = None
    #: images a decoding task or an encoder call takes at a time (128 ran 21%
    #: faster than 32 on a 2-core machine: fewer hand-offs between Ray workers)
    batch_size: int = 128


def connect(address: str | None):
    """The ``ray`` module, joined to the cluster at ``address``."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None
    if not ray.is_initialized():
        _check_reachable(address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "the cluster `ray start` last started here"
            raise RayUnavailable(f"cannot reach the Ray cluster at {where} ({str(exc).splitlines()[0]}); "
                                 "check that it runs (`ray status`), or use --ray-address local for a Ray "
                                 "runtime of this machine alone") from None
    ctx = ray.data.DataContext.get_current()  # imports ray.data, which sets up its loggers
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines, not ours
    ctx.execution_options.preserve_order = True  # the writer needs the scan's order
    ctx.enable_progress_bars = False  # the CLI draws its own
    return ray


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Refuse a cluster address nothing answers at, at once (Ray itself keeps
    retrying for many minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"{address!r} is not a Ray cluster address: give HOST:PORT (the head's GCS port, "
                             "6379 by default) or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check that it "
                             "runs (`ray status` on its head node) and that this machine may connect to it") from None


def encoder_pool(resources: dict, wanted: int | None) -> tuple[int, dict]:
    """How many encoder actors, and the resources each asks for. CPU actors
    leave at least one CPU to the decoding tasks (actors holding every CPU
    would wait forever for images nobody decodes)."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (min(wanted, gpus) if wanted else gpus), {"num_gpus": 1}
    cpus = int(resources.get("CPU", 1))
    return max(1, min(wanted or cpus // 4, cpus - 1)), {"num_cpus": 1}


class RayRunner:
    """A :class:`indexer.pipeline.Runner` on Ray. ``make_encoder`` is a
    picklable callable that builds the model in an actor; ``prepare`` a
    picklable ``PIL image -> model input``."""

    def __init__(self, make_encoder: Callable, prepare: Callable, draft_size: int | None = None,
                 options: RayOptions | None = None):
        self.options = options or RayOptions()
        self.make_encoder = make_encoder
        self.prepare = prepare
        self.draft_size = draft_size
        self.ray = connect(self.options.address)
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        resources = self.ray.cluster_resources()
        actors, _ = encoder_pool(resources, self.options.encoders)
        self.description = (f"Ray cluster: {nodes} node{'s' if nodes != 1 else ''}, {resources.get('CPU', 0):g} CPUs, "
                            f"{resources.get('GPU', 0):g} GPUs, {actors} encoder actor{'s' if actors != 1 else ''}")
        log.info("%s", self.description)

    def listing(self, roots: list[str]) -> Iterable[FoundFile | SkippedFile]:
        units = scan_units(roots)
        if not units:
            return
        rows = [{"path": u.path, "recursive": u.recursive} for u in units]
        ds = self.ray.data.from_items(rows, override_num_blocks=min(len(rows), 64)).flat_map(_list_unit)
        for row in ds.iter_rows():
            if row["reason"]:
                yield SkippedFile(row["path"], row["reason"], bool(row["folder"]))
            else:
                yield FoundFile(row["path"], int(row["size"]), int(row["mtime_ns"]))

    def examined(self, batches: Iterator[list[Changed]],
                 gone_hashes: frozenset[str]) -> Iterator[tuple[list[Changed], list[Examined]]]:
        size = self.options.batch_size
        gone_ref = self.ray.put(gone_hashes)
        window: list[Changed] = []
        out_size = 0  # the writer's batches keep the size they came in
        for batch in batches:
            out_size = out_size or len(batch)
            window.extend(batch)
            if len(window) >= WINDOW:
                yield from _rebatch(self._window(window, gone_ref, size), out_size)
                window = []
        if window:
            yield from _rebatch(self._window(window, gone_ref, size), out_size)

    def _window(self, items: list[Changed], gone_ref, size: int) -> Iterator[tuple[Changed, Examined]]:
        ray = self.ray
        rows = [{"key": k, "path": f.path, "size": f.size, "known": state is not None,
                 "stored_sha": state[3] if state else ""} for k, (f, state) in enumerate(items)]
        actors, resources = encoder_pool(ray.cluster_resources(), self.options.encoders)
        ds = (ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // size, 256)))
              .map_batches(_examine_rows, batch_size=size, num_cpus=1,
                           fn_kwargs={"gone_ref": gone_ref, "draft_size": self.draft_size, "prepare": self.prepare},
                           # a task whose worker died runs again, up to this many times (a file that
                           # crashes the decoder every time stops the run instead of looping); as
                           # their remote arguments differ, Ray keeps these tasks apart from the
                           # encoder actors instead of fusing decoding into them
                           max_retries=DECODE_RETRIES)
              .map_batches(_Encode, batch_size=size, fn_constructor_kwargs={"make_encoder": self.make_encoder},
                           compute=ray.data.ActorPoolStrategy(size=actors), **resources))
        expected = 0
        for out in ds.iter_batches(batch_size=size, batch_format="numpy"):
            for key, blob in zip(out["key"], out["result"]):
                if int(key) != expected:  # a lost or repeated row must stop the run, not reach the store
                    raise RuntimeError(f"Ray returned row {int(key)} where {expected} was due")
                yield items[expected], pickle.loads(blob)
                expected += 1
        if expected != len(items):
            raise RuntimeError(f"Ray returned {expected} of {len(items)} rows")


def _rebatch(pairs: Iterator[tuple[Changed, Examined]], size: int) -> Iterator[tuple[list, list]]:
    batch, results = [], []
    for item, result in pairs:
        batch.append(item)
        results.append(result)
        if len(batch) == size:
            yield batch, results
            batch, results = [], []
    if batch:
        yield batch, results


# -- what runs on the cluster ---------------------------------------------------

def _list_unit(row: dict) -> list[dict]:
    out = []
    for item in scan([row["path"]], recursive=bool(row["recursive"])):
        if isinstance(item, SkippedFile):
            out.append({"path": item.path, "size": 0, "mtime_ns": 0, "reason": item.reason, "folder": item.folder})
        else:
            out.append({"path": item.path, "size": item.size, "mtime_ns": item.mtime_ns, "reason": "",
                        "folder": False})
    return out


def _examine_rows(batch: dict, gone_ref, draft_size: int | None, prepare: Callable) -> dict:
    """Hash each file and decode it from the same bytes, unless it is unchanged
    content or a move (``gone_ref``: the object holding the hashes of
    vanished images, put once; Ray Data hands it over unresolved)."""
    import ray

    gone = ray.get(gone_ref)
    results = []
    for path, size, known, stored in zip(batch["path"], batch["size"], batch["known"], batch["stored_sha"]):
        state = (0, 0, 0, str(stored)) if known else None
        results.append(pickle.dumps(examine(FoundFile(str(path), int(size), 0), state, gone, draft_size, prepare),
                                    protocol=pickle.HIGHEST_PROTOCOL))
    return {"key": batch["key"], "result": np.array(results, dtype=object)}


class _Encode:
    """An encoder actor: embeds the decoded images of each batch."""

    def __init__(self, make_encoder: Callable):
        self.encoder = make_encoder()

    def __call__(self, batch: dict) -> dict:
        results = [pickle.loads(b) for b in batch["result"]]
        todo = [j for j, r in enumerate(results) if not isinstance(r, BadImage) and r[1] is not None]
        if todo:
            vectors, tokens = self.encoder.encode_images_with_tokens([results[j][1][0] for j in todo])
            for n, j in enumerate(todo):
                sha, (_, width, height) = results[j]
                results[j] = (sha, Embedded(np.ascontiguousarray(vectors[n]),
                                            None if tokens is None else np.ascontiguousarray(tokens[n]),
                                            width, height))
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in results]
        return {"key": batch["key"], "result": np.array(blobs, dtype=object)}


def ray_map(address: str | None = None, num_cpus: float = 1, retries: int = DECODE_RETRIES) -> Callable:
    """A map that runs ``fn(item)`` for each item as a Ray task (results in
    the items' order): ``indexer.shards.build_sharded``'s ``parallel_map`` on
    a cluster. A task whose worker died runs again; ``fn`` must be safe to
    repeat (``fill_shard`` is: a shard's file is complete or absent)."""
    ray = connect(address)

    def run(fn: Callable, items: Iterable) -> list:
        task = ray.remote(num_cpus=num_cpus, max_retries=retries)(fn)
        return ray.get([task.remote(item) for item in items])

    return run
