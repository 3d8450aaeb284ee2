"""OpenMP's environment for the kernel threads: libgomp reads it once, when torch loads it, so
whoever starts a serving process (the CLI, a benchmark) calls this before importing torch."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "3000"  # libgomp's default: 300,000


def spin_briefly_when_idle(environ: MutableMapping[str, str] = os.environ) -> None:
    """An idle kernel thread spins briefly, then sleeps. Spinning long (libgomp's default)
    collapses two threads 4-9x when another process holds a core; sleeping at once
    (OMP_WAIT_POLICY=PASSIVE) makes every parallel region pay a wake-up, 1.7x slower on a
    bandwidth-bound model (bench/RESULTS.md). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT
    wins."""
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
