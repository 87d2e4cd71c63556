"""How xmr's inference threads share the CPU.

PyTorch's OpenMP threads spin while they wait for work (GNU OpenMP: 300,000
spins by default). On a CPU that another process keeps busy, each spinning
thread takes a core from the thread that has work, and a 55 ms reranked
`caption` took 1.27 s beside a PyTorch process using both cores (23x).
Passive waiting (OMP_WAIT_POLICY=PASSIVE) gives the core back but costs
11-13 ms a query when the machine is idle; a short spin (3,000) keeps the
idle speed and stays within about 2x when the CPU is shared
(benchmarks/bench_busy.py). OpenMP reads the setting when the library loads,
so :func:`share_cpu` must run before torch is imported (the CLI calls it
first); a setting the user made is kept.
"""

from __future__ import annotations

import os

SPIN_COUNT = "3000"


def share_cpu() -> None:
    """Make inference threads spin briefly before they sleep, unless the user chose otherwise."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
