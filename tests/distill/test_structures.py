"""Configurations for distillation: seeds, rattled/strained copies, teacher MD frames, on-policy selection."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from foundation.distill.structures import (
    ConfigurationSettings,
    force_disagreement,
    generate_configurations,
    min_distance,
    run_md_frames,
    select_disagreeing,
)


def cu(reps=(2, 2, 2), a=3.61) -> Atoms:
    return bulk("Cu", "fcc", a=a, cubic=True).repeat(reps)


def no_md(**kw) -> ConfigurationSettings:
    return ConfigurationSettings(**{"md_steps": 0, **kw})


def test_counts_types_and_seed_copies():
    seeds = [cu((1, 1, 1)), cu((2, 1, 1), a=3.65), molecule("H2O")]
    s = ConfigurationSettings(temperatures=[100, 300], md_steps=6, md_interval=3, rattle_copies=3, strain_copies=2,
                              min_distance=0.4)
    out = generate_configurations(seeds, EMT(), s)
    types = [a.info["config_type"] for a in out]
    # per periodic seed: 1 + 3 rattled + 2 strained + 2 temperatures x 2 frames; the molecule gets no strain
    assert len(out) == 2 * (1 + 3 + 2 + 4) + (1 + 3 + 4)
    assert types[:10] == ["seed"] + ["rattle"] * 3 + ["strain"] * 2 + ["md"] * 4
    assert [a.info["seed_index"] for a in out] == [0] * 10 + [1] * 10 + [2] * 8
    md = [a for a in out if a.info["config_type"] == "md"]
    assert [(a.info["temperature_K"], a.info["md_step"]) for a in md[:4]] == [(100, 3), (100, 6), (300, 3), (300, 6)]
    for i, seed in enumerate(seeds):
        first = next(a for a in out if a.info["seed_index"] == i)
        np.testing.assert_array_equal(first.positions, seed.positions)
        np.testing.assert_array_equal(first.cell.array, seed.cell.array)
        assert first.calc is None and first is not seed
    assert all(a.calc is None for a in out)
    assert len(generate_configurations(seeds, EMT(), no_md(include_seeds=False, rattle_copies=0, strain_copies=1))) == 2


def test_rattle_amplitude_and_strain_geometry():
    seed = cu((3, 3, 3))  # 108 atoms
    s = no_md(rattle_copies=2, rattle_stdev=0.04, strain_copies=3, max_strain=0.02, strain_rattle=0.0)
    out = generate_configurations([seed], None, s)
    for a in out[1:3]:
        d = a.positions - seed.positions
        assert abs(d.std() - 0.04) < 0.004 and abs(d.mean()) < 0.01
        np.testing.assert_array_equal(a.cell.array, seed.cell.array)
    strains = []
    for a in out[3:]:
        e = np.linalg.solve(seed.cell.array, a.cell.array) - np.eye(3)  # cell' = cell (I + e)
        np.testing.assert_allclose(e, e.T, atol=1e-12)
        assert np.abs(e).max() <= 0.02 and np.abs(e).max() > 1e-4
        np.testing.assert_allclose(a.get_scaled_positions(wrap=False), seed.get_scaled_positions(wrap=False),
                                   atol=1e-12)  # atoms moved with the cell
        strains.append(e)
    assert not np.allclose(strains[0], strains[1])


def test_deterministic_and_independent_of_the_other_seeds():
    a, b = cu((1, 1, 1)), cu((1, 1, 2), a=3.58)
    s = ConfigurationSettings(temperatures=[300], md_steps=4, md_interval=2, seed=7)
    both = generate_configurations([a, b], EMT(), s)
    again = generate_configurations([a, b], EMT(), s)
    only_b = generate_configurations([b], EMT(), s)
    assert len(both) == len(again)
    for x, y in zip(both, again):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell.array, y.cell.array)
    of_b = [x for x in both if x.info["seed_index"] == 1]
    for x, y in zip(of_b, only_b):
        np.testing.assert_array_equal(x.positions, y.positions)
    other = generate_configurations([a], EMT(), ConfigurationSettings(temperatures=[300], md_steps=4, md_interval=2,
                                                                      seed=8))
    assert not np.allclose(other[1].positions, both[1].positions)


def test_teacher_md_samples_the_right_temperature_and_keeps_the_centre_of_mass():
    seed = cu((2, 2, 2))
    rng = np.random.default_rng(0)
    msd = {}
    for temperature in (150.0, 600.0):
        frames = run_md_frames(seed, EMT(), temperature, steps=300, interval=20, timestep=5.0, friction=0.05,
                               rng=rng)
        assert [s for s, _ in frames] == list(range(20, 301, 20))
        for _, f in frames:
            np.testing.assert_allclose(f.get_center_of_mass(), seed.get_center_of_mass(), atol=1e-8)
        d = np.array([f.positions - seed.positions for _, f in frames[5:]])
        msd[temperature] = float(np.mean(d ** 2))
    # a harmonic solid: mean-square displacement grows ~linearly with T (classical equipartition)
    assert 2.5 < msd[600.0] / msd[150.0] < 6.5
    # Cu's Einstein frequency (EMT, ~5 THz): <u^2> = 3 kT / (m w^2) per atom -> order 1e-3 A^2 at 150 K
    w = 2 * np.pi * 5e12 * 1e-15 / units.fs  # rad per ASE time unit
    expected = units.kB * 150.0 / (63.546 * w ** 2)
    assert 0.3 < msd[150.0] / expected < 3.0


def test_md_seed_limit_and_collapse_is_reported():
    seeds = [cu((1, 1, 1), a=3.6 + 0.01 * i) for i in range(5)]
    s = ConfigurationSettings(temperatures=[300], md_steps=2, md_interval=1, md_seeds=2, rattle_copies=0,
                              strain_copies=0)
    out = generate_configurations(seeds, EMT(), s)
    assert sorted({a.info["seed_index"] for a in out if a.info["config_type"] == "md"}) == [0, 4]
    with pytest.raises(ValueError, match="closer than 2.6"):
        generate_configurations([cu((1, 1, 1))], EMT(), ConfigurationSettings(temperatures=[300], md_steps=2,
                                                                              md_interval=1, min_distance=2.6,
                                                                              rattle_copies=0, strain_copies=0,
                                                                              include_seeds=False))
    with pytest.raises(ValueError, match="rattled copy 0"):
        generate_configurations([cu((1, 1, 1))], None, no_md(rattle_stdev=0.8, min_distance=2.0))


def test_min_distance_sees_periodic_images():
    assert abs(min_distance(bulk("Cu", "fcc", a=3.6)) - 3.6 / np.sqrt(2)) < 1e-12
    assert min_distance(Atoms("H")) == float("inf")


def test_settings_are_validated_and_round_trip():
    s = ConfigurationSettings(temperatures=[200, 400], md_steps=10)
    assert ConfigurationSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown keys \\['temperature'\\]"):
        ConfigurationSettings.from_dict({"temperature": 300})
    for bad in ({"temperatures": [0]}, {"md_interval": 0}, {"max_strain": 0.7}, {"rattle_stdev": -1}):
        with pytest.raises(ValueError, match="configuration settings"):
            ConfigurationSettings(**bad)
    with pytest.raises(ValueError, match="no seed structures"):
        generate_configurations([], None)


def test_select_disagreeing_picks_the_worst_frames_in_order():
    frames = [cu((1, 1, 1)) for _ in range(5)]
    teacher = [np.zeros((4, 3)) for _ in frames]
    student = [np.zeros((4, 3)) for _ in frames]
    student[1][2] = [0.3, 0.0, 0.4]     # max |dF| 0.5
    student[3][:] = 0.2                 # max |dF| 0.346, but the largest RMS
    student[4][0] = [0.0, 0.5, 0.0]     # ties with frame 1
    picked = select_disagreeing(frames, student, teacher, k=3)
    assert [a.info["frame_index"] for a in picked] == [1, 4, 3]
    np.testing.assert_allclose([a.info["force_disagreement"] for a in picked], [0.5, 0.5, np.sqrt(0.12)])
    assert picked[0] is not frames[1] and picked[0].calc is None
    assert [a.info["frame_index"] for a in select_disagreeing(frames, student, teacher, 1, metric="rms")] == [3]
    assert force_disagreement(student[3], teacher[3], "rms") == pytest.approx(0.2)
    assert len(select_disagreeing(frames, student, teacher, 10)) == 5
    with pytest.raises(ValueError, match="one of each"):
        select_disagreeing(frames, student[:4], teacher, 2)
    with pytest.raises(ValueError, match="frame 2 has 4 atoms"):
        select_disagreeing(frames, student[:2] + [np.zeros((3, 3))] + student[3:], teacher, 2)
    with pytest.raises(ValueError, match="unknown disagreement metric"):
        select_disagreeing(frames, student, teacher, 2, metric="mean")


def test_md_that_blows_up_is_reported_not_passed_on():
    """Finite but huge forces: positions overflow to inf/NaN within the interval: a clear error, not a NaN frame."""
    from ase.calculators.calculator import Calculator, all_changes

    class Exploding(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            forces = np.zeros((len(atoms), 3))
            forces[0] = 1e308
            self.results = {"energy": 0.0, "forces": forces}

    with pytest.raises(ValueError, match="positions became non-finite"):
        run_md_frames(cu((1, 1, 1)), Exploding(), 300.0, steps=40, interval=40, timestep=1.0, friction=0.01,
                      rng=np.random.default_rng(0), min_dist=0.5)


def test_md_of_a_one_atom_cell_runs_on_a_supercell():
    from foundation.distill.structures import md_cell
    prim = bulk("Cu", "fcc", a=3.5)
    assert len(md_cell(prim)) >= 8 and len(md_cell(cu())) == len(cu())
    with pytest.raises(ValueError, match="at least 2 atoms"):
        run_md_frames(prim, EMT(), 250.0, steps=10, interval=10, timestep=1.0, friction=0.02,
                      rng=np.random.default_rng(0))
    s = ConfigurationSettings(temperatures=[250.0], md_steps=10, md_interval=10, rattle_copies=0, strain_copies=0)
    frames = [a for a in generate_configurations([prim], EMT(), s) if a.info["config_type"] == "md"]
    assert frames and all(len(a) >= 8 and np.all(np.isfinite(a.positions)) for a in frames)
