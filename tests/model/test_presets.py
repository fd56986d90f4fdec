"""Presets: MACE-MP-0 architectures (parameter counts equal the published sizes) and the student."""
import pytest
import torch
from ase.data import chemical_symbols
from model_factory import ELEMENTS

from foundation import FoundationModel, ModelConfig, testing
from foundation.model import PRESETS

MP_ELEMENTS = chemical_symbols[1:90]  # 89 elements, H..Ac


@pytest.mark.parametrize("name, count", [("small", 3_847_696), ("medium", 4_688_656), ("large", 5_725_072)])
def test_parameter_counts_equal_mace_mp0(name, count):
    model = FoundationModel(ModelConfig.preset(name, elements=MP_ELEMENTS, dtype="float32"))
    assert model.num_parameters() == count


def test_student_is_small():
    student = FoundationModel(ModelConfig.preset("student", elements=MP_ELEMENTS, dtype="float32"))
    small = ModelConfig.preset("small", elements=MP_ELEMENTS)
    assert student.num_parameters() < 0.3 * 3_847_696
    assert student.config.r_max < small.r_max and student.config.max_L == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_conform(name, ethanol, small_cell):
    """Every preset at full width: symmetries and smoothness in float32 and float64; FD in float64."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(name, elements=ELEMENTS, avg_num_neighbors=30.0, dtype="float64",
                             atomic_energies=[-1.0, -2.0, -3.0, -4.0], shift=0.5, scale=2.0)
    model = FoundationModel(cfg)
    testing.check_isolated_atoms(model)
    testing.check_rotation(model, small_cell)
    testing.check_forces_fd(model, ethanol, max_atoms=2)
    testing.check_stress_fd(model, small_cell)
    testing.check_cutoff_smoothness(model, ethanol)
    model32 = FoundationModel(ModelConfig.from_dict(dict(cfg.to_dict(), dtype="float32")))
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    testing.check_rotation(model32, ethanol)
    testing.check_permutation(model32, small_cell)
    testing.check_batch_consistency(model32, [ethanol, small_cell])
