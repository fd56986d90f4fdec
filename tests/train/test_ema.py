"""EMA: the update formula with warm-up decay, weights swapped in and restored exactly, state round trip."""
from __future__ import annotations

import pytest
import torch

from foundation.train.ema import EMA


def test_update_formula_and_applied_context():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                    # n = 0: d = min(0.9, 1/10) = 0.1
    expected = 0.1 * w0 + 0.9 * (w0 + 1.0)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    trained = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), trained)


def test_state_round_trip_and_mismatch():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMA(a, 0.99)
    ema.update(a)
    other = EMA(b, 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(ValueError, match="same model"):
        EMA(torch.nn.Linear(2, 2, bias=False), 0.9).load_state_dict(ema.state_dict())
