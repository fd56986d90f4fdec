"""mace-torch side of scripts/bench_model.py. Runs in the mace-torch venv (scripts/setup_mace_venv.sh).

  <mace-venv>/bin/python scripts/_mace_worker.py --serve      (started and driven by WorkerClient below)

Gets the request of bench_model.py (hyperparameters, structures, workloads, timing, threads, dtype) and
builds mace-torch's ScaleShiftMACE the way `mace_run_train --model ScaleShiftMACE` does with its CLI defaults
(RealAgnosticResidualInteractionBlock for every layer including the first, radial MLP [64, 64, 64], readout
MLP 16x0e with silu, use_reduced_cg False), hidden irreps C x (0e + 1o + ... up to L), zero atomic energies,
scale 1 / shift 0, avg_num_neighbors = mean neighbour count of the benchmarked structure, random weights.
Graphs come from mace's own pipeline (config_from_atoms -> AtomicData.from_config, matscipy neighbour list)
and are built outside the timed region. Then times single repeats on command, so that the driver can
alternate them with its own. With "model_file" in the request the worker times that saved mace model instead
(the same weights as an imported copy; scripts/bench_mace_speed.py), and `--build-mp0 DIR` writes a random-weight
MACE-MP-0 medium model (89 elements) there, with its dump. Never imports `foundation`. ``WorkerClient``
(used by bench_model.py in our venv) starts and drives this worker; this module imports mace only inside
functions for that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_model import LocalRunner, training_loss  # same folder: the same timing and loss code

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def hidden_irreps(channels: int, max_L: int) -> str:
    """e3nn irreps string C x (0e + 1o + 2e ...) up to max_L, e.g. '128x0e+128x1o'."""
    return "+".join(f"{channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(max_L + 1))


class MaceSide:
    """Builds mace-torch models and batches for the workloads of ``bench_model.LocalRunner``."""

    def __init__(self, hyper: dict, use_reduced_cg: bool = False, model_file: str | None = None):
        self.hyper = hyper
        self.use_reduced_cg = use_reduced_cg
        self.params: dict[str, int] = {}
        self.loaded = None
        if model_file:  # a saved mace model (a pickle written by build_mp0), cast to the default dtype
            self.loaded = torch.load(model_file, map_location="cpu", weights_only=False).to(torch.get_default_dtype())
            self.hyper = dict(hyper, r_max=float(self.loaded.r_max))

    def table(self, atomic_numbers: list[int]) -> list[int]:
        """The model's element table: the loaded model's own, or the elements of the structure(s)."""
        return [int(z) for z in self.loaded.atomic_numbers.tolist()] if self.loaded is not None else atomic_numbers

    def model(self, atomic_numbers: list[int], avg_num_neighbors: float) -> torch.nn.Module:
        """A ScaleShiftMACE for these elements (sorted atomic numbers) in the default dtype, or the loaded model."""
        if self.loaded is not None:
            self.params["loaded"] = sum(p.numel() for p in self.loaded.parameters())
            return self.loaded
        from e3nn import o3
        from mace import modules
        h = self.hyper
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=float(h["r_max"]), num_bessel=int(h["num_bessel"]),
            num_polynomial_cutoff=int(h["num_poly_cutoff"]), max_ell=int(h["max_ell"]),
            interaction_cls=block, interaction_cls_first=block, num_interactions=int(h["num_layers"]),
            num_elements=len(atomic_numbers), hidden_irreps=o3.Irreps(hidden_irreps(h["num_channels"], h["max_L"])),
            MLP_irreps=o3.Irreps(f"{int(h.get('readout_mlp', 16))}x0e"), atomic_energies=np.zeros(len(atomic_numbers)),
            avg_num_neighbors=float(avg_num_neighbors), atomic_numbers=list(atomic_numbers),
            correlation=int(h["correlation"]), gate=torch.nn.functional.silu,
            radial_MLP=list(h.get("radial_mlp", [64, 64, 64])), use_reduced_cg=self.use_reduced_cg,
            atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        )
        from ase.data import chemical_symbols
        key = "+".join(sorted(chemical_symbols[z] for z in atomic_numbers))  # same keys as bench_model's
        self.params[key] = sum(p.numel() for p in model.parameters())
        return model

    def batch(self, frames, atomic_numbers: list[int]) -> dict:
        """mace's batch dict for ``frames`` (labels from info['energy'] / arrays['forces'] when present)."""
        from mace import data as mace_data
        from mace.tools import AtomicNumberTable, torch_geometric
        keyspec = mace_data.KeySpecification(info_keys={"energy": "energy"}, arrays_keys={"forces": "forces"})
        table = AtomicNumberTable(list(atomic_numbers))
        graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a, key_specification=keyspec),
                                                   z_table=table, cutoff=float(self.hyper["r_max"]))
                  for a in frames]
        return torch_geometric.Batch.from_data_list(graphs).to_dict()

    def edges(self, atoms) -> int:
        return int(self.batch([atoms], self.table(sorted(set(atoms.numbers.tolist()))))["edge_index"].shape[1])

    def infer(self, atoms, stress: bool, avg_num_neighbors: float):
        z = self.table(sorted(set(atoms.numbers.tolist())))
        model = self.model(z, avg_num_neighbors).eval()
        batch = self.batch([atoms], z)
        # prepare_graph writes displaced positions/shifts into the dict when stress is on: pass a fresh copy.
        return lambda: model(dict(batch), training=False, compute_force=True, compute_stress=stress)

    def train(self, frames, avg_num_neighbors: float):
        z = self.table(sorted(set(np.concatenate([a.numbers for a in frames]).tolist())))
        model = self.model(z, avg_num_neighbors).train()
        batch = self.batch(frames, z)
        natoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(torch.get_default_dtype())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(dict(batch), training=True, compute_force=True)
            loss = training_loss(out["energy"], out["forces"], batch["energy"], batch["forces"], natoms)
            loss.backward()
            opt.step()
        return step


class WorkerClient:
    """The mace-torch side: scripts/_mace_worker.py under ``python`` (the mace venv), driven over a pipe with
    one JSON command per line; same interface as ``LocalRunner``."""

    def __init__(self, python: str, threads: int):
        if not Path(python).is_file():
            raise FileNotFoundError(f"--mace-python {python} does not exist; create the venv with "
                                    "`bash scripts/setup_mace_venv.sh [DIR]` and pass DIR/bin/python")
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)  # the mace venv must not see our package
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--serve"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def call(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"mace-torch worker died (exit {self.proc.wait()}):\n{self.log.read()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"mace-torch worker: {reply['error']}")
        return reply

    def prepare(self, request: dict) -> dict:
        return self.call(cmd="prepare", request=request)

    def warmup(self, name: str, calls: int) -> None:
        self.call(cmd="warmup", workload=name, calls=calls)

    def repeat(self, name: str, min_time: float) -> float:
        return self.call(cmd="repeat", workload=name, min_time=min_time)["seconds"]

    def evaluate(self, name: str) -> dict:
        return self.call(cmd="evaluate", workload=name)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def serve(commands, reply) -> None:
    """Answer one JSON command per line of ``commands`` with one JSON line through ``reply(dict)``.

    {"cmd": "prepare", "request": {...}} builds models and graphs (threads, dtype, seed from the request) and
    answers {workloads: {name: {count, atoms, edges}}, params, versions}; {"cmd": "warmup", "workload", "calls"};
    {"cmd": "repeat", "workload", "min_time"} answers {"seconds": per call}. End of input stops the worker.
    """
    runner = None
    for line in commands:
        command = json.loads(line)
        try:
            if command["cmd"] != "prepare" and runner is None:
                raise ValueError(f"command {command['cmd']!r} before 'prepare': send the request first")
            if command["cmd"] == "prepare":
                request = command["request"]
                torch.set_num_threads(int(request["threads"]))
                torch.set_default_dtype(DTYPES[request["dtype"]])
                torch.manual_seed(int(request.get("seed", 0)))
                runner = LocalRunner(MaceSide(request["hyper"], bool(request.get("mace_reduced_cg", False)),
                                              request.get("model_file")))
                answer = runner.prepare(request)
                import e3nn
                import mace
                answer["versions"] = {"torch": torch.__version__, "e3nn": e3nn.__version__, "mace": mace.__version__,
                                      "threads": torch.get_num_threads(), "dtype": request["dtype"]}
            elif command["cmd"] == "warmup":
                runner.warmup(command["workload"], int(command["calls"]))
                answer = {}
            elif command["cmd"] == "evaluate":
                answer = runner.evaluate(command["workload"])
            elif command["cmd"] == "repeat":
                answer = {"seconds": runner.repeat(command["workload"], float(command["min_time"]))}
            else:
                answer = {"error": f"unknown command {command['cmd']!r}"}
        except Exception as err:  # reported to the driver, which raises it with this text
            answer = {"error": f"{type(err).__name__}: {err}"}
        reply(answer)


# MACE-MP-0 medium as published (ACEsuit/mace-mp, mace_mp_0 training scripts): ScaleShiftMACE, residual
# interaction blocks (first too), 128x0e+128x1o, 2 layers, correlation 3, max_ell 3, r_max 6 Å, 10 Bessel, p 5,
# radial MLP [64, 64, 64], readout 16x0e silu, unreduced CG. 89 elements H..Ac, as tests/model/test_presets.py.
MP0_MEDIUM = dict(r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3, num_interactions=2, correlation=3,
                  hidden_irreps="128x0e+128x1o", MLP_irreps="16x0e", radial_MLP=[64, 64, 64])


def build_mp0(out_dir: str, seed: int = 0) -> dict:
    """Random-weight MACE-MP-0 medium in float64 (random E0s, scale, shift; avg_num_neighbors 60): saves
    OUT/mp0_medium.model and dumps it with foundation/interop/mace_dump.py (loaded by path) into OUT/dump."""
    import importlib.util

    from e3nn import o3
    from mace import modules
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    zs, h = list(range(1, 90)), MP0_MEDIUM
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=h["r_max"], num_bessel=h["num_bessel"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
        max_ell=h["max_ell"], interaction_cls=block, interaction_cls_first=block,
        num_interactions=h["num_interactions"],
        num_elements=len(zs), hidden_irreps=o3.Irreps(h["hidden_irreps"]), MLP_irreps=o3.Irreps(h["MLP_irreps"]),
        atomic_energies=rng.normal(-3.0, 1.0, len(zs)), avg_num_neighbors=60.0, atomic_numbers=zs,
        correlation=h["correlation"], gate=torch.nn.functional.silu, radial_MLP=h["radial_MLP"], use_reduced_cg=False,
        atomic_inter_scale=float(rng.uniform(0.5, 2.0)), atomic_inter_shift=float(rng.normal(0.0, 0.3)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mp0_medium.model"
    torch.save(model, path)
    spec = importlib.util.spec_from_file_location(
        "mace_dump", Path(__file__).resolve().parents[1] / "foundation" / "interop" / "mace_dump.py")
    dumper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dumper)
    dumper.dump_model(torch.load(path, weights_only=False), out / "dump", {"file": path.name,
                                                                          "sha256": dumper.sha256_of(path)})
    return {"model_file": str(path), "dump": str(out / "dump"), "params": sum(p.numel() for p in model.parameters()),
            "hyper": {**h, "model": "ScaleShiftMACE", "elements": len(zs), "seed": seed}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--serve", action="store_true", help="read JSON commands on stdin, answer JSON lines on stdout")
    mode.add_argument("--build-mp0", metavar="DIR", help="write a random-weight MACE-MP-0 medium model + dump to DIR")
    args = parser.parse_args(argv)
    # e3nn 0.4.4 loads its own packaged constants.pt with torch.load; torch >= 2.6 needs this to allow it.
    # Set here, in the worker process only (WorkerClient also sets it), never in bench_model's process.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    if args.build_mp0:
        print(json.dumps(build_mp0(args.build_mp0)))
        return 0
    # Keep the protocol on the real stdout; anything mace or e3nn prints goes to stderr instead.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(answer: dict) -> None:
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
    serve(sys.stdin, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
