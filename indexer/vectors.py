"""FAISS vector indexes keyed by database ids.

An index is described by a factory string plus search parameters, both
stored beside it. Small collections use exact inner-product search
(``IDMap2,Flat``); past :data:`EXACT_LIMIT` vectors an IVF index is chosen,
with ``nprobe`` set so that recall@10 against exact search stays >= 0.95,
holding float vectors up to :data:`COMPRESS_LIMIT`, 8-bit codes past it and
product codes after a learned rotation past :data:`PQ_LIMIT`
(``indexer.shards`` builds those from shards, merged on disk, for a
collection past one machine's memory). Removal really removes (``remove_ids``). Files are written atomically, with
a JSON sidecar that records the store generation the index reflects.
On a machine where faiss sees a GPU, searches run on a GPU copy of the index.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
_GPU_LOCK = threading.Lock()

EXACT_LIMIT = 50_000
# Past this many vectors, product codes (OPQ + IVF-PQ, 64 bytes of codes
# and 8 of id a vector instead of SQ8's 265), re-scored exactly from the
# stored vectors: benchmarks/bench_ivfpq.py (RESULTS section 11).
PQ_LIMIT = 10_000_000
# Past this many vectors, IVF keeps 8-bit codes instead of float32 vectors
# (257 instead of 1,028 bytes a vector with the query bank's bias column), so
# that an index of millions still fits a laptop's memory; recall@10 against
# exact search is 0.962 from the codes alone at 1.5M vectors, 1.0 once the
# engine re-scores its candidates from the stored floats (benchmarks/RESULTS.md).
COMPRESS_LIMIT = 1_000_000


def _faiss():
    import faiss

    return faiss


@dataclass
class IndexSpec:
    factory: str
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"factory": self.factory, "params": self.params}

    @property
    def nlist(self) -> int:
        """The number of inverted lists of an IVF spec ("IVF4096,Flat",
        "OPQ64_256,IVF4096,PQ64": 4096)."""
        return int(next(part for part in self.factory.split(",") if part.startswith("IVF"))[3:])

    @property
    def codes(self) -> str:
        """What an IVF spec stores a vector as: "Flat", "SQ8" or "PQ"."""
        last = self.factory.split(",")[-1]
        return "PQ" if last.startswith("PQ") else last


def pq_spec(n_vectors: int, dim: int, code_bytes: int | None = None, nprobe: int | None = None,
            rescore: int = 10, nlist: int | None = None) -> IndexSpec:
    """The OPQ + IVF-PQ spec for ``n_vectors`` of ``dim`` dimensions:
    ``nlist`` about sqrt(n) unless given (a power of two, 64 to 65,536),
    ``nprobe`` a quarter of the lists, ``code_bytes`` sub-quantizers of 8
    bits (default: 64 from 256 dimensions up, else a power of two near
    dim/4) after a learned rotation to the largest multiple of
    ``code_bytes`` not above ``dim``; ``rescore``: how many times the hits
    wanted a search fetches for exact re-scoring."""
    if code_bytes is None:
        code_bytes = 64 if dim >= 256 else max(4, 2 ** int(math.log2(max(dim, 4) // 4)))
    if nlist is None:
        nlist = int(2 ** round(math.log2(math.sqrt(max(n_vectors, 1)))))
        nlist = max(64, min(nlist, 65536))
    d_out = dim - dim % code_bytes
    if d_out == 0:
        raise ValueError(f"{code_bytes} code bytes need at least {code_bytes} dimensions, not {dim}")
    return IndexSpec(f"OPQ{code_bytes}_{d_out},IVF{nlist},PQ{code_bytes}",
                     {"nprobe": nprobe or max(16, nlist // 4), "rescore": rescore})


def choose_spec(n_vectors: int, exact_limit: int = EXACT_LIMIT, compress_limit: int = COMPRESS_LIMIT,
                dim: int | None = None, pq_limit: int = PQ_LIMIT) -> IndexSpec:
    """The index type for a collection of ``n_vectors`` (of ``dim``
    dimensions: needed past ``pq_limit``)."""
    if n_vectors <= exact_limit:
        return IndexSpec("IDMap2,Flat")
    if n_vectors > pq_limit and dim is not None and dim >= 16:
        return pq_spec(n_vectors, dim)
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n_vectors))))
    nlist = max(64, min(nlist, 65536))
    nprobe = max(16, nlist // 4)
    codes = "SQ8" if n_vectors > compress_limit else "Flat"
    return IndexSpec(f"IVF{nlist},{codes}", {"nprobe": nprobe})


def spec_still_fits(spec: IndexSpec, n_vectors: int, exact_limit: int = EXACT_LIMIT,
                    compress_limit: int = COMPRESS_LIMIT, pq_limit: int = PQ_LIMIT) -> bool:
    """Whether an index built as ``spec`` may keep growing in place at
    ``n_vectors``, or should be rebuilt as the type :func:`choose_spec` picks.

    There is slack on both sides so that a collection hovering at a boundary
    is not rebuilt on every run: exact search is kept up to 1.25x the limit,
    an IVF index is kept while its ``nlist`` is within 2x of the ideal, and
    its codes (float or 8-bit) within 0.75x-1.25x of the compression limit.
    """
    if spec.factory == "IDMap2,Flat":
        return n_vectors <= exact_limit * 1.25
    if spec.codes == "PQ":
        ideal = min(max(math.sqrt(max(n_vectors, 1)), 64), 65536)
        return n_vectors > pq_limit * 0.75 and ideal / 2 <= spec.nlist <= ideal * 2
    if spec.factory.startswith("IVF"):
        if n_vectors > pq_limit * 1.25:
            return False
        if n_vectors <= exact_limit * 0.75:
            return False
        if spec.factory.endswith(",Flat") and n_vectors > compress_limit * 1.25:
            return False
        if spec.factory.endswith(",SQ8") and n_vectors <= compress_limit * 0.75:
            return False
        ideal = min(max(4 * math.sqrt(max(n_vectors, 1)), 64), 65536)
        return ideal / 2 <= spec.nlist <= ideal * 2
    return False


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A FAISS index of L2-normalised vectors searched by inner product."""

    def __init__(self, dim: int, spec: IndexSpec, use_gpu: bool | None = None):
        faiss = _faiss()
        self.dim = dim
        self.spec = spec
        self.index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self._gpu_index = None
        self._gpu_res = None
        #: the store generation these vectors reflect (None: not yet known)
        self.generation: int | None = None

    # -- building -------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def exact_scores(self) -> bool:
        """Whether search scores are exact (float vectors) rather than
        estimated from 8-bit or product codes."""
        return self.spec.factory == "IDMap2,Flat" or self.spec.codes == "Flat"

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def train(self, sample: np.ndarray) -> None:
        if self.needs_training:
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        self._gpu_index = None

    def fill(self, batches) -> None:
        """Add every (ids, vectors) of ``batches()`` (re-iterable) to this
        empty, trained IVF index, each inverted list allocated once at its
        final size: grown one add at a time, the lists end up holding about
        1.7x the memory their vectors need (300,000 x 257-d: 501 MB instead of
        296). Two passes: assign every vector to its list and count, then add
        with those assignments (the coarse quantizer runs once, as in ``add``).
        Assignments are kept by id, so rows that another process adds or
        removes between the passes cannot shift them onto other vectors."""
        faiss = _faiss()
        if not ("IVF" in self.spec.factory and self.ntotal == 0):
            raise ValueError(f"fill() fills an empty IVF index, not {self.spec.factory} of {self.ntotal}")
        ivf = faiss.extract_index_ivf(self.index)
        # a rotation before the IVF (OPQ): the lists hold rotated vectors
        chain = faiss.downcast_index(self.index)
        steps = ([faiss.downcast_VectorTransform(chain.chain.at(i)) for i in range(chain.chain.size())]
                 if isinstance(chain, faiss.IndexPreTransform) else [])

        def transformed(vecs):
            x = np.ascontiguousarray(vecs, dtype=np.float32)
            for step in steps:
                x = step.apply(x)
            return np.ascontiguousarray(x, dtype=np.float32)

        def assign(x):
            return ivf.quantizer.assign(x, 1).ravel().astype(np.int64)

        seen = [(np.asarray(ids, np.int64), assign(transformed(vecs))) for ids, vecs in batches()]
        known_ids = np.concatenate([i for i, _ in seen]) if seen else np.zeros(0, np.int64)
        known_lists = np.concatenate([a for _, a in seen]) if seen else np.zeros(0, np.int64)
        del seen
        order = np.argsort(known_ids, kind="stable")
        known_ids, known_lists = known_ids[order], known_lists[order]
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        counts = np.bincount(known_lists, minlength=ivf.nlist)
        for list_no in np.flatnonzero(counts):
            lists.resize(int(list_no), int(counts[list_no]))  # sets the capacity ...
            lists.resize(int(list_no), 0)  # ... which shrinking the size keeps
        for ids, vecs in batches():
            x = transformed(vecs)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            labels = np.full(len(ids), -1, np.int64)
            if len(known_ids):
                pos = np.minimum(np.searchsorted(known_ids, ids), len(known_ids) - 1)
                hit = known_ids[pos] == ids
                labels[hit] = known_lists[pos[hit]]
            new = labels < 0  # rows written since the first pass
            if new.any():
                labels[new] = assign(x[new])
            ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(labels))
        if steps:  # the wrapper counts what its IVF holds only when it adds itself
            self.index.ntotal = ivf.ntotal
        self._gpu_index = None

    def remove(self, ids) -> int:
        faiss = _faiss()
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return 0
        self._gpu_index = None
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    # -- searching ------------------------------------------------------------
    def _set_nprobe(self) -> None:
        nprobe = self.spec.params.get("nprobe")
        if nprobe is not None:
            _faiss().extract_index_ivf(self.index).nprobe = nprobe

    def _searcher(self):
        """The index to search: a GPU copy where FAISS has a GPU (made on
        first use after a change; it takes ``nprobe`` from the CPU index, as
        a GPU IVF index is no ``IndexIVF`` to set it on), else the index."""
        if self.use_gpu and self._gpu_index is None:
            self._gpu_index = self._to_gpu()
        return self.index if self._gpu_index is None else self._gpu_index

    def _to_gpu(self):
        """A GPU copy of the index, or None (and CPU search from then on)
        where FAISS cannot make one."""
        faiss = _faiss()
        self._set_nprobe()
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            return faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        except RuntimeError as exc:
            error = exc
        # builds with cuVS send IVF through it by default; FAISS's own GPU kernels are the fallback
        options = faiss.GpuClonerOptions() if hasattr(faiss, "GpuClonerOptions") else None
        if options is not None and hasattr(options, "use_cuvs"):
            options.use_cuvs = False
            try:
                return faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index, options)
            except RuntimeError as exc:
                error = exc
        lines = str(error).strip().splitlines()
        log.warning("cannot copy the %s index to the GPU (%s); searching it on the CPU",
                    self.spec.factory, lines[-1] if lines else type(error).__name__)
        self.use_gpu = False
        return None

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """Top-``k`` (scores, ids) per query; ids are -1 where fewer exist.

        ``allowed_ids`` restricts the search to those ids inside FAISS
        (an ID selector), so a filter never costs recall.
        """
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, max(1, self.ntotal)))
        if self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        self._set_nprobe()
        if allowed_ids is None:
            if not self.use_gpu:  # CPU indexes answer concurrent searches
                return self.index.search(q, k)
            with _GPU_LOCK:  # one GPU copy, made on first use, searched by one thread at a time
                return self._searcher().search(q, k)
        # Selectors run on the CPU index.
        sel = faiss.IDSelectorBatch(np.asarray(allowed_ids, dtype=np.int64))
        nprobe = self.spec.params.get("nprobe")
        if nprobe is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(q, k, params=params)

    # -- persistence ------------------------------------------------------------
    def save(self, path: str | os.PathLike, facts: dict, vectors: bool = True) -> None:
        """Write the index and its JSON sidecar, each atomically; with
        ``vectors=False`` only the sidecar (the file on disk already holds
        these vectors)."""
        faiss = _faiss()
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        stmp = path.with_name(f"{path.name}.json.{os.getpid()}.tmp")
        try:
            if vectors:
                try:
                    faiss.write_index(self.index, str(tmp))
                except RuntimeError as exc:  # FAISS reports a failed write (a full disk) this way
                    raise OSError(errno.EIO, f"FAISS could not write the index ({str(exc).splitlines()[-1]})",
                                  str(tmp)) from None
                os.replace(tmp, path)
            side = {"dim": self.dim, **self.spec.to_json(), "ntotal": self.ntotal, "generation": self.generation,
                    **facts}
            stmp.write_text(json.dumps(side, indent=2))
            os.replace(stmp, path.with_name(path.name + ".json"))
        finally:  # nothing half-written stays behind
            tmp.unlink(missing_ok=True)
            stmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, use_gpu: bool | None = None) -> tuple["VectorIndex", dict]:
        faiss = _faiss()
        path = Path(path)
        side = json.loads(path.with_name(path.name + ".json").read_text())
        obj = cls.__new__(cls)
        obj.dim = side["dim"]
        obj.spec = IndexSpec(side["factory"], side.get("params", {}))
        obj.index = faiss.read_index(str(path))
        obj.use_gpu = gpu_available() if use_gpu is None else use_gpu
        obj._gpu_index = None
        obj._gpu_res = None
        obj.generation = side.get("generation")
        return obj, side


def build_index(dim: int, batches, n_vectors: int, exact_limit: int = EXACT_LIMIT,
                use_gpu: bool | None = None, compress_limit: int = COMPRESS_LIMIT,
                pq_limit: int = PQ_LIMIT) -> VectorIndex:
    """Build the right index for ``n_vectors`` from an iterable of (ids, vectors).

    ``batches`` must be re-iterable (a callable returning a fresh iterator)
    when the chosen index needs training.
    """
    spec = choose_spec(n_vectors, exact_limit, compress_limit, dim, pq_limit)
    index = VectorIndex(dim, spec, use_gpu)
    if index.needs_training:
        want = min(n_vectors, max(spec.nlist * (64 if spec.codes == "PQ" else 39), 20_000))
        sample, got = np.empty((want, dim), np.float32), 0  # filled in place: one copy, not two
        for _, vecs in batches():
            take = min(len(vecs), want - got)
            sample[got : got + take] = vecs[:take]
            got += take
            if got >= want:
                break
        index.train(sample[:got])
        del sample
        index.fill(batches)
    else:
        for ids, vecs in batches():
            index.add(ids, vecs)
    log.info("built %s over %d vectors", spec.factory, index.ntotal)
    return index
