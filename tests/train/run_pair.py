"""Train the test pair potential from a recipe, as a separate process
(``python run_pair.py RECIPE [--resume | --overwrite]``).

Used by the kill-and-resume and multi-rank tests (also under ``torchrun``). ``FOUNDATION_TEST_STEP_DELAY``
(seconds) slows each training forward down so a test can kill the run at a step of its choosing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: pair_model

import torch  # noqa: E402
from pair_model import PairPotential  # noqa: E402

from foundation.train.config import load_config  # noqa: E402
from foundation.train.loop import run  # noqa: E402


class SlowPair(PairPotential):
    def forward(self, batch, **kwargs):
        if kwargs.get("training", True):
            time.sleep(float(os.environ.get("FOUNDATION_TEST_STEP_DELAY", "0")))
        return super().forward(batch, **kwargs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--float64", action="store_true", help="a float64 model (for engine.precision fp64)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.recipe, args.set)
    torch.manual_seed(1234)
    model = SlowPair([28, 29], r_max=4.0)
    again = {"overwrite": True} if args.overwrite else {}   # (keeps the runner usable on code without the flag)
    run(config, model=model.double() if args.float64 else model, resume=args.resume, **again)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
