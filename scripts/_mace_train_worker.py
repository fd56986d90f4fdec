"""mace-torch side of scripts/bench_accuracy.py. Runs in the mace-torch venv (scripts/setup_mace_venv.sh).

  <mace-venv>/bin/python scripts/_mace_train_worker.py --hyper HYPER.json --result OUT.json -- RUN_TRAIN_ARGS...

Trains with mace-torch's own training CLI, in this process: ``mace.cli.run_train.run`` on the arguments after
``--`` (exactly what ``mace_run_train ARGS`` does), so the baseline is mace's own loop, data pipeline, loss,
optimizer, EMA and final error tables. Before that it counts the parameters of the same architecture
(``_mace_worker.MaceSide`` builds ScaleShiftMACE with mace_run_train's default blocks) from HYPER.json:
{"hyper": {r_max, num_bessel, num_poly_cutoff, max_ell, num_layers, num_channels, max_L, correlation,
radial_mlp, readout_mlp}, "atomic_numbers": [...], "threads": int}. Writes OUT.json: {"params", "train_seconds"
(wall time of run(), setup and final evaluation included), "loop_seconds" / "loop_cpu_seconds" (wall / CPU
time of mace.tools.train, the epoch loop), "versions"}. The per-epoch times and test errors
are read from mace's log by the driver. Never imports ``foundation``; loads no checkpoint itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def count_parameters(hyper: dict, atomic_numbers: list[int]) -> int:
    """Trainable parameters of mace-torch's ScaleShiftMACE with these hyperparameters and elements."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _mace_worker import MaceSide  # the colleague's builder: same blocks as mace_run_train's defaults
    model = MaceSide(hyper).model(sorted(atomic_numbers), avg_num_neighbors=1.0)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def time_training_loop() -> dict:
    """Wrap ``mace.tools.train`` (the epoch loop run_train calls: initial validation, then per epoch training,
    validation and checkpoint) to measure its wall and CPU seconds (this process); returns the live totals."""
    import mace.tools
    original, totals = mace.tools.train, {"cpu": 0.0, "wall": 0.0}

    def timed(*args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals["cpu"] += time.process_time() - cpu
            totals["wall"] += time.perf_counter() - wall
    mace.tools.train = timed
    return totals


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: _mace_train_worker.py --hyper H.json --result OUT.json -- MACE_RUN_TRAIN_ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hyper", required=True, help="JSON file: hyper, atomic_numbers, threads")
    parser.add_argument("--result", required=True, help="JSON file written at the end")
    args = parser.parse_args(argv[:split])
    # e3nn 0.4.4 loads its own packaged constants.pt with torch.load; torch >= 2.6 needs this to allow it.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    request = json.loads(Path(args.hyper).read_text())
    torch.set_num_threads(int(request["threads"]))
    params = count_parameters(request["hyper"], request["atomic_numbers"])

    import e3nn
    import mace
    from mace.cli.run_train import run
    from mace.tools import build_default_arg_parser
    mace_args = build_default_arg_parser().parse_args(argv[split + 1:])
    loop = time_training_loop()
    start = time.perf_counter()
    run(mace_args)
    seconds = time.perf_counter() - start
    Path(args.result).write_text(json.dumps({
        "params": params, "train_seconds": seconds, "loop_cpu_seconds": loop["cpu"], "loop_seconds": loop["wall"],
        "versions": {"torch": torch.__version__, "e3nn": e3nn.__version__, "mace": mace.__version__,
                     "threads": torch.get_num_threads()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
