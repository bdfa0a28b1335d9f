"""The scenarios of the standard and smoke sets (issue 8).

kind "fanout": N subscribers, a publisher in one of three modes:
  window  closed loop, at most `window` events unacknowledged; each event is its own publish
          call (window 2 keeps the next event waiting while the server writes the current
          one, so a 2-core machine's scheduling delays do not idle the server)
  burst   `burst` events in one write, then wait for their acknowledgements
  paced   open loop at `rate` deliveries/s (events/s = rate / matching clients)
kind "storm": connect + authenticate + subscribe + close, `total` times
kind "idle": N subscribers that stay connected; server RSS per connection
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # fanout | storm | idle
    clients: int = 0
    mode: str = "window"
    duration: float = 4.0
    window: int = 2
    burst: int = 0
    rate: int = 0  # deliveries/s (paced)
    groups: int = 0  # filtered: each event matches clients/groups subscribers
    total: int = 0  # storm
    concurrency: int = 128  # storm / connect
    fresh: bool = False  # start a fresh server (RSS figures)
    servers: tuple[str, ...] = ("gateway", "picows", "websockets")
    params: dict[str, Any] = field(default_factory=dict)
    # Rounds per server when the run repeats at all (the larger of this and --repeat): a tail
    # latency ratio on a shared machine needs more than a throughput figure.
    rounds: int = 0
    # One round even when the run repeats: a figure the machine's other load does not move
    # (RSS per idle connection measured the same to 0.1 KiB in every round).
    single_round: bool = False

    def matches_per_event(self) -> int:
        return self.clients // self.groups if self.groups else self.clients


ALL = ("gateway", "picows", "websockets", "centrifugo")


def standard() -> list[Scenario]:
    return [
        Scenario("broadcast-300", "fanout", clients=300, servers=ALL),
        Scenario("broadcast-1000", "fanout", clients=1000, servers=ALL),
        Scenario("broadcast-3000", "fanout", clients=3000, servers=ALL),
        # As many connections as filtered-10k, each getting every event: filtered-10k ÷ this
        # separates what filtering costs from what writing to 10,000 sockets costs.
        Scenario("broadcast-10k", "fanout", clients=10000, servers=("gateway", "picows")),
        # window 20: 20 events x 100 matches = 2,000 deliveries per window, as broadcast-1000's
        # 2 x 1,000. Acknowledgements come when an event is accepted, so at saturation what is
        # queued is bounded by the gateway's back-pressure, not by the window.
        Scenario("filtered-10k", "fanout", clients=10000, groups=100, window=20, duration=5.0, servers=ALL),
        # The control for filtered-10k: the same deliveries, each client's filter one equality
        # shared by its group (a bucket hit decides, no predicate left to evaluate), so the two
        # differ only in what the index does.
        Scenario("filtered-eq-10k", "fanout", clients=10000, groups=100, window=20, duration=5.0,
                 servers=("gateway",), params={"predicate": "eq"}),
        # filtered-10k with the publisher sending its events 20 to a request of the batch
        # endpoint (docs/protocol.md §8): what the per-request cost takes from the figure above.
        # Window 40 (two requests in flight): with 20, one batch, the gateway would wait for the
        # publisher's next request after each answer.
        Scenario("filtered-batch-10k", "fanout", clients=10000, groups=100, window=40, duration=5.0,
                 servers=("gateway",), params={"batch": 20}),
        Scenario("paced-100k", "fanout", clients=1000, mode="paced", rate=100_000, duration=5.0, servers=ALL,
                 rounds=3),
        # 3 s: no baseline sustains this rate, and each takes as long again to drain its queue
        # (websockets ~12 s at 5 s), which kept the standard set near its 10-minute budget.
        Scenario("paced-300k", "fanout", clients=1000, mode="paced", rate=300_000, duration=3.0, servers=ALL),
        Scenario("bursty-50", "fanout", clients=1000, mode="burst", burst=50, duration=4.0),
        # Events from PostgreSQL: single-row INSERT commits at 100/s, read from the replication
        # stream (the gateway only: the baselines have no change feed).
        Scenario("pg-paced-100k", "fanout", clients=1000, mode="paced", rate=100_000, duration=5.0,
                 servers=("gateway",), params={"source": "postgres"}),
        Scenario("storm", "storm", total=4000, concurrency=128, servers=ALL),
        Scenario("idle-20k", "idle", clients=20000, fresh=True, concurrency=256, single_round=True, servers=ALL),
    ]


def smoke() -> list[Scenario]:
    """Every scenario kind at toy size, for CI (~20 s): the gateway and the picows baseline,
    plus the websockets baseline once so its driver does not rot."""
    two = ("gateway", "picows")
    return [
        Scenario("broadcast-100", "fanout", clients=100, duration=0.7, servers=two + ("websockets",)),
        # Centrifugo where it is built (never in CI): its tags filter is driven nowhere else.
        Scenario("filtered-200", "fanout", clients=200, groups=10, window=4, duration=0.7,
                 servers=two + ("centrifugo",)),
        Scenario("filtered-eq-200", "fanout", clients=200, groups=10, window=4, duration=0.7, servers=("gateway",),
                 params={"predicate": "eq"}),
        Scenario("filtered-batch-200", "fanout", clients=200, groups=10, window=8, duration=0.7, servers=("gateway",),
                 params={"batch": 4}),
        Scenario("paced-5k", "fanout", clients=100, mode="paced", rate=5000, duration=0.7, servers=two),
        Scenario("bursty-50", "fanout", clients=100, mode="burst", burst=50, duration=0.7, servers=two),
        Scenario("pg-paced-5k", "fanout", clients=100, mode="paced", rate=5000, duration=0.7,
                 servers=("gateway",), params={"source": "postgres"}),
        Scenario("storm", "storm", total=100, concurrency=16, servers=two),
        Scenario("idle-300", "idle", clients=300, servers=two),
    ]
