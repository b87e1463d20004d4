"""Per-call cost of mlops.routing.route for each mode (it runs once per online request)."""

from __future__ import annotations

import timeit

from mlops.routing import Mode, RouteTable, route

CASES = {
    "single": (RouteTable(), ("user-123", "req-1", None)),
    "blue_green": (RouteTable(mode=Mode.BLUE_GREEN), ("user-123", "req-1", None)),
    "shadow 10%": (RouteTable(mode=Mode.SHADOW, mirror_pct=10, salt="r1"), ("user-123", "req-1", None)),
    "canary 5%": (RouteTable(mode=Mode.CANARY, weight_pct=5, salt="r1"), ("user-123", "req-1", None)),
    "ab 50%": (RouteTable(mode=Mode.AB, weight_pct=50, salt="r1"), ("user-123", "req-1", None)),
    "ab forced": (RouteTable(mode=Mode.AB, weight_pct=50, salt="r1"), ("user-123", "req-1", "candidate")),
}

if __name__ == "__main__":
    n = 200_000
    for name, (table, args) in CASES.items():
        best = min(timeit.repeat(lambda: route(table, *args), number=n, repeat=5)) / n
        print(f"{name:12s} {best * 1e9:7.0f} ns/call")
