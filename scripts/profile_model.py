"""Where our model's CPU time goes: torch.profiler tables of energy + forces on bench_model's 256-atom Cu cell.

Rows '## name' are forward ranges of submodules (inclusive, forward only); backward shows up as
'autograd::engine::evaluate_function: ...Backward' rows. Same structure, preset and settings as
scripts/bench_model.py (whose helpers this imports).

  python scripts/profile_model.py --preset small --L 0,1 --out prof.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_model beside this file
from bench_model import OursSide, copper_cell, mean_neighbors  # noqa: E402


def _label_modules(model: torch.nn.Module, depth: int) -> list:
    """Forward hooks that wrap each submodule (up to ``depth`` dots in its name) in a profiler range '## name'."""
    from torch.autograd.profiler import record_function
    handles, open_ranges = [], []

    def pre(name):
        def hook(module, args):
            rf = record_function(f"## {name}")
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def post(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post)]
    return handles


def profile(path: Path, preset: str, Ls: list[int], dtype: str, calls: int = 2) -> None:
    """torch.profiler of our energy+forces on the 256-atom Cu cell for each L; tables written to ``path``.

    Rows '## name' are forward ranges of submodules (inclusive, forward only); backward shows up as
    'autograd::engine::evaluate_function: ...Backward' rows.
    """
    from torch.profiler import ProfilerActivity, profile
    lines = [f"# our model, preset {preset}, 256-atom Cu fcc, r_max from the preset, energy+forces, {calls} calls "
             f"after 1 warmup, threads {torch.get_num_threads()}, {dtype}; load {os.getloadavg()}"]
    atoms = copper_cell()
    for L in Ls:
        side = OursSide(preset, {"max_L": L}, dtype)
        model, batch = side.model([atoms], mean_neighbors(atoms, side.config(["Cu"]).r_max))
        model.eval()
        model(batch, compute_forces=True, training=False)
        handles = _label_modules(model, depth=3)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                model(batch, compute_forces=True, training=False)
            wall = (time.perf_counter() - start) / calls
        for h in handles:
            h.remove()
        lines.append(f"\n## L={L}: {wall:.3f} s per call under the profiler ({len(atoms) / wall:.1f} atom-steps/s)")
        for key in ("self_cpu_time_total", "cpu_time_total"):
            lines.append(f"\n### L={L}: top rows by {key}\n")
            lines.append(prof.key_averages().table(sort_by=key, row_limit=35, max_name_column_width=80))
        lines.append(f"\n### L={L}: top ops by self CPU time, split by input shapes\n")
        lines.append(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=110))
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="ModelConfig preset")
    p.add_argument("--L", default="0,1", help="comma-separated max_L values to profile")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=2, help="profiled calls per L (after one warm-up call)")
    p.add_argument("--out", default="profile.txt", help="write the tables here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile(Path(args.out), args.preset, [int(x) for x in args.L.split(",")], args.dtype, args.calls)
    print(f"profile of our model written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
