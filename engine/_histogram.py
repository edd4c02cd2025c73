"""A fixed-bucket histogram of plain numbers, cheap enough for the order path.

The journal and the gateway record into these; the metrics collector turns them into Prometheus
histograms at scrape time, so the order path never calls the client library.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["FixedHistogram", "LATENCY_BOUNDS", "SIZE_BOUNDS"]

# seconds: 10 us .. 10 s
LATENCY_BOUNDS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
# counts (records per batch and the like)
SIZE_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000)


class FixedHistogram:
    """Bucket counts for ``value <= bound`` (non-cumulative; the last bucket is +Inf)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound label, cumulative count) pairs, ending with "+Inf", as Prometheus wants."""
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (inf if beyond the last bound)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            if running >= rank:
                return float(bound)
        return float("inf")
