"""The garbage collector in a long-running process: start-up's objects kept out of its way.

A process's modules, settings, models and connections live as long as it does; every full
collection scanned them all again, a pause that lands on whatever requests are in flight (the
hot path's tail). Per-request garbage is nearly all freed by reference counting; the cyclic
collector only has to find the few cycles, and can look less often.
"""

from __future__ import annotations

import gc

# Net allocations between young-generation collections (CPython's default is 700, a collection
# every ~100 requests at the edge). Each young collection scans what is alive in the young
# generation, the requests in flight included: 10,000 keeps one to a few milliseconds even when
# a backlog is in flight, and runs the middle and full collections 14 times less often.
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once the process has started: collect start-up's garbage, move everything that survived into
    the permanent generation (never scanned again) and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
