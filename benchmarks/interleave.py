"""Interleaved timing shared by the benchmark scripts: every run timed once per round, the order rotated
each round, so a neighbour's load on this shared machine hits all runs alike; medians over rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable


def median_rates(runs: dict[Hashable, Callable[[], int]], *, rounds: int, seconds: float = 0.5) -> dict:
    """Median items/s per key. A run is a call returning how many items it processed; each timing is
    preceded by one untimed call and lasts at least `seconds`."""
    keys = list(runs)
    rates: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            runs[k]()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                n += runs[k]()
            rates[k].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}
