"""The tiny-model factory of the model tests (2 layers, 8 channels: builds in ms). A module with its own name
(not conftest) so that tests import it unambiguously whichever other test directories run alongside."""
import torch

from foundation import FoundationModel, ModelConfig

ELEMENTS = ["H", "C", "O", "Cu"]


def tiny_model(seed: int = 0, **overrides) -> FoundationModel:
    """A random 8-channel model over H, C, O, Cu with non-trivial statistics (float64 unless overridden)."""
    fields = dict(elements=ELEMENTS, num_channels=8, max_L=1, r_max=4.0, num_bessel=6, radial_mlp=[16, 16],
                  readout_mlp=8, avg_num_neighbors=6.0, atomic_energies=[-13.6, -1030.0, -2040.0, -4.5],
                  scale=1.3, shift=-0.7, dtype="float64")
    fields.update(overrides)
    torch.manual_seed(seed)
    return FoundationModel(ModelConfig(**fields))
