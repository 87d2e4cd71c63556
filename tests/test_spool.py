"""The on-disk list the indexer keeps its changed files in."""

from indexer.spool import Spool
from indexer.walk import FoundFile


def test_spool_gives_back_every_item_in_order_in_batches():
    items = [(FoundFile(f"/photos/{i:05d}.jpg", i, 10 * i), None if i % 3 else (i, i, 10 * i, "ab" * 32))
             for i in range(1003)]
    with Spool(chunk=100) as spool:  # many chunks on disk, and a partial one in memory
        for item in items:
            spool.append(item)
        assert len(spool) == 1003
        batches = list(spool.batches(64))
        assert [len(b) for b in batches] == [64] * 15 + [43]
        assert [x for b in batches for x in b] == items
        assert [x for b in spool.batches(1000) for x in b] == items  # read again from the start


def test_empty_spool_has_no_batches():
    with Spool() as spool:
        assert len(spool) == 0 and list(spool.batches(8)) == []
