"""Bandit allocation benchmark: Thompson sampling against a fixed 50/50 A/B on the same simulator.

    .venv/bin/python bench/bandit.py --runs 400

Both policies run the same seeded experiments (``mlops.rollout.bandit.simulate``: Bernoulli
rewards, 400 labelled answers a tick, the same stopping rule, a winner confirmed on two
ticks, at most 150 ticks of experiment in a horizon of 300). The only difference is the
traffic split while the experiment runs: Thompson shares (floored at 5 %) or a fixed 50/50.

For each scenario it prints, per policy, how often the candidate was promoted (its
false-promotion rate where the candidate is not better), the mean cumulative regret over
the horizon (reward lost against always serving the better arm) and the mean length of
the experiment, then the regret ratio bandit / A/B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mlops.rollout.bandit import BanditPolicy, simulate  # noqa: E402

SCENARIOS = {
    "candidate better (0.10 -> 0.12)": (0.10, 0.12),
    "candidate worse (0.12 -> 0.10)": (0.12, 0.10),
    "equal (0.10 = 0.10)": (0.10, 0.10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="seeded experiments per scenario and policy")
    parser.add_argument("--draws", type=int, default=2000, help="posterior draws per assessment")
    args = parser.parse_args()
    policy = BanditPolicy(threshold=0.99, max_expected_loss=0.001, min_samples=500, draws=args.draws)
    started = time.perf_counter()
    for label, rates in SCENARIOS.items():
        row = {}
        for name, adaptive in (("bandit", True), ("ab 50/50", False)):
            results = [
                simulate(
                    rates,
                    policy,
                    seed=s,
                    adaptive=adaptive,
                    confirm_ticks=2,
                    max_ticks=150,
                    horizon_ticks=300,
                )
                for s in range(args.runs)
            ]
            promoted = sum(r.winner == 1 for r in results) / len(results)
            regret = statistics.fmean(r.regret for r in results)
            ticks = statistics.fmean(r.ticks for r in results)
            row[name] = regret
            print(
                f"{label:34s} {name:9s} candidate promoted {promoted:6.1%}  "
                f"regret {regret:8.1f}  experiment {ticks:5.1f} ticks"
            )
        if row["ab 50/50"] > 0:
            print(f"{label:34s} regret ratio bandit / ab = {row['bandit'] / row['ab 50/50']:.2f}")
    print(f"({args.runs} runs per scenario and policy, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
