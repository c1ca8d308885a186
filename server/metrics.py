"""Process metrics in Prometheus text format (no client library needed).

Counters are plain integers bumped on the hot path; gauges are read from the
hub when ``/metrics`` is scraped, so collecting costs nothing between scrapes.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from typing import Final

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.total += 1


class Metrics:
    """All of Squall's counters in one object, owned by the hub."""

    def __init__(self) -> None:
        self.messages_in = 0  # commands received
        self.messages_out = 0  # replies and pushes queued
        self.bytes_in = 0
        self.bytes_out = 0
        self.publications = 0  # publications accepted (client or API)
        self.deliveries = 0  # publication pushes queued to subscribers
        self.disconnects: defaultdict[int, int] = defaultdict(int)
        self.commands: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.api_requests: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []

        def counter(name: str, help_text: str, value: float, labels: str = "") -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            lines.append(f"{name}{labels} {value}")

        for name, (help_text, read) in sorted(self.gauges.items()):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {read()}")
        counter("squall_messages_in_total", "Commands received from clients.", self.messages_in)
        counter(
            "squall_messages_out_total", "Replies and pushes sent to clients.", self.messages_out
        )
        counter("squall_bytes_in_total", "Bytes received from clients.", self.bytes_in)
        counter("squall_bytes_out_total", "Bytes queued to clients.", self.bytes_out)
        counter("squall_publications_total", "Publications accepted.", self.publications)
        counter("squall_deliveries_total", "Publication pushes queued.", self.deliveries)
        lines.append("# HELP squall_disconnects_total Disconnects by code.")
        lines.append("# TYPE squall_disconnects_total counter")
        for code, n in sorted(self.disconnects.items()):
            lines.append(f'squall_disconnects_total{{code="{code}"}} {n}')
        lines.append("# HELP squall_api_requests_total Server API requests by method.")
        lines.append("# TYPE squall_api_requests_total counter")
        for method, n in sorted(self.api_requests.items()):
            lines.append(f'squall_api_requests_total{{method="{method}"}} {n}')
        name = "squall_command_duration_seconds"
        lines.append(f"# HELP {name} Client command latency by method.")
        lines.append(f"# TYPE {name} histogram")
        for method, hist in sorted(self.commands.items()):
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, hist.counts, strict=False):
                cumulative += count
                lines.append(f'{name}_bucket{{method="{method}",le="{bound}"}} {cumulative}')
            lines.append(f'{name}_bucket{{method="{method}",le="+Inf"}} {hist.total}')
            lines.append(f'{name}_sum{{method="{method}"}} {hist.sum}')
            lines.append(f'{name}_count{{method="{method}"}} {hist.total}')
        return "\n".join(lines) + "\n"
