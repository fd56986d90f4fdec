"""Readouts: one output per head, heads independent, zero features give zero energy."""
import torch

from foundation.nn.readout import LinearReadout, NonLinearReadout


def test_heads_are_independent():
    torch.manual_seed(0)
    for readout in (LinearReadout(6, 3, torch.float64), NonLinearReadout(6, 4, 3, torch.float64)):
        x = torch.randn(5, 6, dtype=torch.float64)
        before = readout(x)
        assert before.shape == (5, 3)
        with torch.no_grad():
            for p in readout.parameters():
                p[..., 1] = 0.0 if p.dim() == 2 and p.shape[-1] == 3 else p[..., 1]
            if isinstance(readout, NonLinearReadout):
                readout.weight_out[1] = 0.0
        after = readout(x)
        assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])
        assert torch.all(after[:, 1] == 0)
        assert torch.all(readout(torch.zeros(2, 6, dtype=torch.float64)) == 0)


def test_nonlinear_readout_parameter_count():
    assert sum(p.numel() for p in NonLinearReadout(128, 16, 1, torch.float32).parameters()) == 16 * 128 + 16
