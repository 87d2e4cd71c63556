"""xmr: cross-modal retrieval. The Python API mirrors the CLI::

    from retrieval import open_index

    engine = open_index("~/.local/share/xmr/index")
    engine.index(["~/Pictures"])
    for hit in engine.search("a dog running on the beach", k=5):
        print(hit.rank, hit.score, hit.path)

Nothing heavy is imported until it is used.
"""

from __future__ import annotations

__all__ = ["Engine", "open_index"]


def open_index(index_dir, **kwargs):
    """Open (or create) an index; keyword arguments go to :meth:`Engine.open`."""
    from .engine import Engine

    return Engine.open(index_dir, **kwargs)


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
