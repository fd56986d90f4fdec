"""Per-l and per-element linear maps, element embedding."""
import math

import torch
from e3nn import o3

from foundation.nn.linear import ElementEmbedding, ElementGroups, ElementLinear, IrrepsLinear


def test_element_groups_from_sorted():
    groups = ElementGroups.from_sorted(torch.tensor([0, 0, 2, 2, 2, 3]), 5)
    assert groups.slices == ((0, 0, 2), (2, 2, 5), (3, 5, 6))


def test_element_linear_equals_one_hot_tensor_product():
    torch.manual_seed(0)
    lin = ElementLinear(1, num_elements=3, c_in=4, c_out=5, dtype=torch.float64)
    z = torch.tensor([0, 1, 1, 2])
    x = torch.randn(4, 4, 4, dtype=torch.float64)
    out = lin(x, ElementGroups.from_sorted(z, 3))
    onehot = torch.nn.functional.one_hot(z, 3).double()
    for l, sl in ((0, slice(0, 1)), (1, slice(1, 4))):
        ref = torch.einsum("nmc,ne,ecd->nmd", x[:, sl], onehot, lin.weights[l]) / math.sqrt(4 * 3)
        assert torch.allclose(out[:, sl], ref)


def test_irreps_linear_is_equivariant():
    torch.manual_seed(1)
    lin = IrrepsLinear(2, 3, 6, torch.float64)
    d = o3.Irreps("0e+1o+2e").D_from_matrix(o3.rand_matrix(dtype=torch.float64))
    x = torch.randn(5, 9, 3, dtype=torch.float64)
    def rot(v):
        return torch.einsum("ij,njc->nic", d, v)
    assert torch.allclose(lin(rot(x)), rot(lin(x)), atol=1e-6)


def test_embedding_gathers_rows():
    emb = ElementEmbedding(4, 3, torch.float64)
    out = emb(torch.tensor([3, 0]))
    assert out.shape == (2, 1, 3)
    assert torch.allclose(out[0, 0], emb.weight[3] / 2.0)
