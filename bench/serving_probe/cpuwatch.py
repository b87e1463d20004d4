"""CPU used by processes outside a set of process trees (other work sharing the machine)."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks incl. reaped children)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        ppid = int(rest[1])
        ticks = int(rest[11]) + int(rest[12])
        out[int(name)] = (ppid, ticks)
    return out


def _tree(procs: dict[int, tuple[int, int]], roots: set[int]) -> set[int]:
    mine = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return mine


def _total_busy() -> int:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + f[4]
    return sum(f[:8]) - idle


class ForeignCpu:
    """Cores used by everything except ``roots``' process trees between start() and stop()."""

    def __init__(self, roots: set[int]) -> None:
        self.roots = roots | {os.getpid()}

    def start(self) -> None:
        self.t0 = os.times().elapsed
        self.busy0 = _total_busy()
        procs = _procs()
        mine = _tree(procs, self.roots)
        self.mine0 = {p: procs[p][1] for p in mine}

    def stop(self) -> dict[str, float]:
        elapsed = os.times().elapsed - self.t0
        busy = _total_busy() - self.busy0
        procs = _procs()
        mine = _tree(procs, self.roots)
        own = sum(procs[p][1] - self.mine0.get(p, 0) for p in mine if p in procs)
        return {
            "machine_cores": round(busy / TICK / elapsed, 2),
            "own_cores": round(own / TICK / elapsed, 2),
            "foreign_cores": round(max(busy - own, 0) / TICK / elapsed, 2),
        }


if __name__ == "__main__":
    import time

    w = ForeignCpu(set())
    w.start()
    time.sleep(5)
    print(w.stop())
