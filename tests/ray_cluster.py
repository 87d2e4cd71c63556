"""A throwaway Ray cluster of several nodes on this machine for the tests:
``ray start --head`` and ``ray start --address`` on 127.0.0.1, each in a
session of its own with ``--block``, stopped by killing those sessions (not
``ray stop``, which would stop every Ray node of the user)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .postgres import free_port


def ray_command() -> str | None:
    """The ``ray`` command beside this Python, or on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else shutil.which("ray")


class RayCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1):
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # token authentication, with a token of this cluster's own, for every process that joins it
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        self._procs: list[subprocess.Popen] = []
        # logs and sockets of this cluster alone (a short path: Unix socket names are limited)
        self.temp_dir = tempfile.mkdtemp(prefix="xmr-ray-")

    def _start(self, *args: str) -> None:
        common = [f"--num-cpus={self.cpus}", "--num-gpus=0", "--object-store-memory=300000000",
                  "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
        self._procs.append(subprocess.Popen([ray_command(), "start", *args, *common], env=self.env,
                                            start_new_session=True, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))

    def alive_nodes(self) -> int:
        res = subprocess.run([ray_command(), "status", "--address", self.address], env=self.env,
                             capture_output=True, text=True, timeout=60)
        if res.returncode:
            return 0
        active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return active.count("node_")

    def start(self) -> "RayCluster":
        self._start("--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}")
        for _ in range(self.nodes - 1):
            self._wait(1)
            self._start(f"--address={self.address}")
        self._wait(self.nodes)
        return self

    def _wait(self, nodes: int, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError("a Ray node exited while starting")
            if self.alive_nodes() >= nodes:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster at {self.address} did not reach {nodes} nodes in {timeout:.0f} s")

    def stop(self) -> None:
        for p in self._procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.time() + 10
        for p in self._procs:
            try:
                p.wait(max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # what did not stop on SIGTERM (`ray start --block` itself, workers)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
