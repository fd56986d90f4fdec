"""Benchmark sides that run a `foundation export torchscript` artifact (imported by bench_model.py --artifact and
bench_artifact_md.py): ``ScriptSide`` for the inference workloads, ``ArtifactCalculator`` for ASE MD; and
``CompiledSide`` (bench_model.py --compiled), our model through ``foundation.integrations.compiled``."""
from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from bench_model import OursSide


def graph_inputs(batch) -> dict:
    """Artifact inputs from a foundation graph batch (``foundation.data.from_atoms``)."""
    return {"pos": batch.pos, "atomic_numbers": batch.atomic_numbers, "edge_index": batch.edge_index,
            "shifts": batch.shifts, "cell": batch.cell.view(-1, 3, 3), "pbc": batch.pbc.view(-1, 3),
            "batch": batch.batch}


class ScriptSide(OursSide):
    """Our model exported with ``build_artifact`` (TorchScript) in the benchmark's dtype; inference only."""

    def infer(self, atoms, stress: bool, avg_num_neighbors: float):
        from foundation.integrations.artifact import build_artifact
        model, batch = self.model([atoms], avg_num_neighbors)
        artifact = build_artifact(model.eval(), dtype=self.dtype)
        artifact.compute_stress = stress
        inputs = graph_inputs(batch)
        return lambda: artifact(inputs)

    def train(self, frames, avg_num_neighbors: float):
        raise ValueError("the TorchScript artifact is for inference: drop asp_train from --workloads with --artifact")


class CompiledSide(OursSide):
    """Our model through ``compile_model`` (torch.compile, inductor) in the benchmark's dtype; inference only. The
    compile time (first call, untimed) is kept in ``compile_s``."""

    compile_s: dict = {}

    def infer(self, atoms, stress: bool, avg_num_neighbors: float):
        import time

        from foundation.integrations.compiled import compile_model
        model, batch = self.model([atoms], avg_num_neighbors)
        compiled = compile_model(model.eval(), dtype=self.dtype)
        start = time.perf_counter()
        compiled(batch, compute_stress=stress)
        self.compile_s[self.preset] = time.perf_counter() - start
        return lambda: compiled(batch, compute_stress=stress)

    def train(self, frames, avg_num_neighbors: float):
        raise ValueError("the compiled model is for inference: drop asp_train from --workloads with --compiled")


class ArtifactCalculator(Calculator):
    """ASE calculator over a TorchScript artifact with the skin neighbour list of ``FoundationCalculator``."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, artifact, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        from foundation.calculator import SkinNeighborList
        self.artifact = artifact
        self.artifact.compute_stress = False
        self.neighbors = SkinNeighborList(float(artifact.r_max), skin)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        edges, unit = self.neighbors(a.positions, a.cell.array, a.pbc, a.numbers)
        cell = torch.tensor(a.cell.array)
        out = self.artifact({"pos": torch.tensor(a.positions), "atomic_numbers": torch.tensor(a.numbers),
                             "edge_index": torch.tensor(edges), "shifts": torch.tensor(unit) @ cell,
                             "cell": cell.unsqueeze(0), "pbc": torch.tensor(a.pbc).unsqueeze(0)})
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": out["forces"].detach().to(torch.float64).numpy().astype(np.float64)}
