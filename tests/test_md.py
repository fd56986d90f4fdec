"""MD with FoundationCalculator: NVE energy conservation (and that the check catches bad forces), NVT/NPT, md()."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import read, write

from foundation.calculator import FoundationCalculator
from foundation.md import initialize_velocities, make_dynamics, md, run_md

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_calculator import PairModel, _one_torch_thread, foundation_model, pair_model  # noqa: E402,F401


def cu_au_32() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
    atoms.symbols[::4] = "Au"
    return atoms


def nve_energy_deviation(calc: FoundationCalculator, steps: int = 500, timestep_fs: float = 1.0) -> float:
    """max_t |Etot(t) - Etot(0)| / N (eV/atom) over an NVE run of the 32-atom cell from 300 K."""
    atoms = cu_au_32()
    atoms.calc = calc
    initialize_velocities(atoms, 300.0, seed=0)
    dyn = make_dynamics(atoms, "nve", timestep_fs, 300.0)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    e = np.asarray(energies) / len(atoms)
    assert len(e) == steps + 1
    return float(np.abs(e - e[0]).max())


class ScaledForces(FoundationCalculator):
    """Forces 10% too large: no longer -dE/dr, so total energy is not conserved (the drift check must see it)."""

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["forces"] = 1.1 * self.results["forces"]


@pytest.mark.slow
def test_nve_conserves_energy_with_a_small_float64_foundation_model():
    deviation = nve_energy_deviation(FoundationCalculator(foundation_model(), dtype="float64"))
    print(f"NVE 32 atoms, 1 fs, 500 steps: max |Etot - Etot(0)| = {deviation:.3g} eV/atom")
    assert deviation < 1e-4


@pytest.mark.slow
def test_nve_check_fails_for_non_conservative_forces():
    assert nve_energy_deviation(ScaledForces(foundation_model(), dtype="float64"), steps=200) > 1e-4


def test_run_md_nvt_npt_write_trajectory_and_log(tmp_path):
    for ensemble in ("nvt", "npt"):
        atoms = cu_au_32()
        atoms.calc = FoundationCalculator(pair_model())
        v0 = atoms.get_volume()
        s = run_md(atoms, 20, 600.0, ensemble, 2.0, trajectory=tmp_path / "new" / f"{ensemble}.traj",
                   log=tmp_path / "new" / f"{ensemble}.log", interval=5, pressure_gpa=1.0)  # dir made on demand
        assert s.steps == 20 and s.atoms == 32 and s.ns_per_day > 0 and s.atom_steps_per_s > 0
        assert abs(s.ns_per_day - 20 * 2e-6 / s.wall_s * 86400) < 1e-9 * s.ns_per_day
        frames = read(tmp_path / "new" / f"{ensemble}.traj", ":")
        assert len(frames) == 5 and frames[-1].get_potential_energy() != frames[0].get_potential_energy()
        lines = (tmp_path / "new" / f"{ensemble}.log").read_text().splitlines()
        assert lines[0].split()[:2] == ["Time[ps]", "Etot/N[eV]"] and len(lines) == 1 + 5
        if ensemble == "npt":
            assert atoms.get_volume() != v0  # the barostat moved the cell


def test_npt_keeps_the_neighbor_list_when_the_cell_changes():
    runs = {}
    for skin in (0.0, 1.0):  # skin 0: a fresh list at every step
        atoms = cu_au_32()
        atoms.calc = FoundationCalculator(pair_model(), skin=skin)
        initialize_velocities(atoms, 600.0, seed=0)
        dyn = make_dynamics(atoms, "npt", 2.0, 600.0, pressure_gpa=5.0)
        frames = []

        def record(atoms=atoms, frames=frames):
            frames.append((atoms.get_potential_energy(), atoms.get_stress(), atoms.get_volume()))

        dyn.attach(record)
        dyn.run(30)
        runs[skin] = frames, atoms.calc.neighbors.builds
    (fresh, fresh_builds), (kept, kept_builds) = runs[0.0], runs[1.0]
    volumes = [v for _, _, v in kept]
    assert len(set(volumes)) == 31  # the barostat changed the cell at every step
    print(f"NPT 30 steps: {kept_builds} neighbor-list builds with skin 1 Å, {fresh_builds} without; "
          f"max |dE| {max(abs(a[0] - b[0]) for a, b in zip(fresh, kept)):.2g} eV")
    assert fresh_builds == 31 and kept_builds <= 2
    for (e0, s0, _), (e1, s1, _) in zip(fresh, kept):
        assert abs(e0 - e1) <= 1e-12 * max(1.0, abs(e0))
        np.testing.assert_allclose(s0, s1, rtol=0, atol=1e-12)


def test_md_loads_a_saved_model_and_reports_speed(tmp_path, capsys):
    pair_model().save_pretrained(tmp_path / "model")
    structure = tmp_path / "cell.xyz"
    write(structure, cu_au_32())
    s = md(str(tmp_path / "model"), structure, 10, 300.0, "nve", 1.0, interval=5, model_class=PairModel)
    assert Path(s.trajectory) == tmp_path / "cell.md.traj" and Path(s.log) == tmp_path / "cell.md.log"
    assert len(read(s.trajectory, ":")) == 3 and s.energy_drift_ev_per_atom < 1e-3
    assert "ns/day" in str(s) and "atom-steps/s" in str(s)


def test_md_errors_are_clear(tmp_path):
    water = molecule("H2O")
    water.calc = FoundationCalculator(pair_model(elements=("H", "O")))
    with pytest.raises(ValueError, match="npt needs a fully periodic"):
        run_md(water, 2, 300.0, "npt")
    with pytest.raises(ValueError, match="unknown ensemble 'nph'"):
        run_md(water, 2, 300.0, "nph")
    with pytest.raises(FileNotFoundError, match="structure file"):
        md(str(tmp_path), tmp_path / "absent.xyz", 2, 300.0, model_class=PairModel)


def test_cli_md_runs_a_saved_foundation_model(tmp_path, capsys):
    from foundation.cli import main
    foundation_model().save_pretrained(tmp_path / "model")
    write(tmp_path / "cell.xyz", cu_au_32())
    rc = main(["md", str(tmp_path / "model"), str(tmp_path / "cell.xyz"), "--steps", "6", "--temperature", "300",
               "--ensemble", "nvt", "--timestep", "2", "--interval", "3", "--head", "r2scan"])
    out = capsys.readouterr().out
    assert rc == 0 and "ns/day" in out and "atom-steps/s" in out
    assert len(read(tmp_path / "cell.md.traj", ":")) == 3
    assert len((tmp_path / "cell.md.log").read_text().splitlines()) == 1 + 3


def test_cli_md_compile_runs_through_the_compiled_energy(tmp_path, capsys, monkeypatch):
    """``foundation md --compile`` hands ``compile=True`` to the calculator: the run goes through
    ``integrations.compiled`` (here with the aot_eager backend: same tracing, no C++ build) for the chosen head."""
    from foundation.cli import main
    from foundation.integrations import compiled as compiled_module
    made = []

    def quick(model, head=None, dtype=None, device="cpu"):
        made.append(compiled_module.CompiledModel(model, head, dtype, backend="aot_eager", device=device))
        return made[-1]

    monkeypatch.setattr(compiled_module, "compile_model", quick)
    foundation_model().save_pretrained(tmp_path / "model")
    write(tmp_path / "cell.xyz", cu_au_32())
    rc = main(["md", str(tmp_path / "model"), str(tmp_path / "cell.xyz"), "--steps", "4", "--temperature", "300",
               "--interval", "2", "--head", "r2scan", "--compile"])
    assert rc == 0 and "ns/day" in capsys.readouterr().out
    assert [m.head for m in made] == ["r2scan"]
    assert len(read(tmp_path / "cell.md.traj", ":")) == 3
