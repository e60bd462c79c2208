"""How often BOHB's rule would model a lower rung than the server does, in the race.

BOHB's rule fits the sampler on the highest rung with at least d + 3 observations (d: the
number of parameters). The server's TPE models the top level only (complete trials, with
stopped ones as bad guesses) and samples at random until 10 trials have finished. This
replays the search-efficiency race's stagetune arm (``bench/search_efficiency.py``, the
same tables, budget and 4 asynchronous workers) and counts, per seed, how many of the
first 10 trials to finish ran to the end: where fewer than d + 3 did, BOHB's rule would
model the lower rung for the next suggestions, until enough complete.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bohb_window.py --seeds 30    # ~2 min
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import search_efficiency as se
from record_curves import DEFAULT_OUT, load_table

STARTUP = 10  # TPE's random start-up trials in the race (a third of the budget, at most 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--trials", type=int, default=60, help="budget: this many full runs")
    parser.add_argument("--stages", nargs="+", default=["sft", "pretrain_proxy", "dpo"])
    args = parser.parse_args()
    rows = load_table(DEFAULT_OUT)
    finished: list[bool] = []  # stopped?, in the order trials finish
    end = se._Server.end

    def logged(self: se._Server, handle: Any, row: se.Row, stopped: bool) -> None:
        finished.append(stopped)
        end(self, handle, row, stopped)

    se._Server.end = logged  # type: ignore[method-assign]
    for stage in args.stages:
        table = se.load_stage(stage, rows, args.trials, se.REPO / "configs")
        need = len(table.spec.search_space) + 3
        complete = []
        for seed in range(args.seeds):
            finished.clear()
            se.replay(table, "stagetune", seed, args.trials)
            complete.append(sum(not s for s in finished[:STARTUP]))
        c = np.array(complete)
        print(
            f"{stage}: of the first {STARTUP} trials to finish, {np.median(c):.0f} completed "
            f"(median; min {c.min()}, max {c.max()}); BOHB's rule needs {need} at the top level: "
            f"{np.mean(c < need):.0%} of {args.seeds} seeds would model a lower rung first",
            flush=True,
        )


if __name__ == "__main__":
    main()
