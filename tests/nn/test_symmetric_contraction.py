"""The reduced symmetric contraction equals MACE's dense formula, is equivariant, and double-differentiable."""
import pytest
import torch
from e3nn import o3

from foundation.nn.cg import coupling_trees
from foundation.nn.linear import ElementGroups
from foundation.nn.symmetric_contraction import SymmetricContraction


def _dense_mace(sc, a, z, l_out, correlation, max_ell):
    """B[i, LM, c] = sum_nu sum_k W_nu[z_i, k, c] sum_a U_nu[M, a.., k] prod A[i, a, c] with unreduced U."""
    letters = "abd"
    outs = []
    for L in range(l_out + 1):
        acc = 0
        for nu in range(1, correlation + 1):
            u = coupling_trees(nu, max_ell, L)
            w = sc.weights[f"L{L}_nu{nu}"][z]
            idx = letters[:nu]
            acc = acc + torch.einsum(f"m{idx}k,nkc," + ",".join(f"n{x}c" for x in idx) + "->nmc", u, w, *([a] * nu))
        outs.append(acc)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("l_out, correlation, max_ell", [(0, 3, 3), (1, 3, 3), (2, 3, 3), (1, 2, 2), (2, 1, 3)])
def test_matches_dense_mace_formula(l_out, correlation, max_ell):
    torch.manual_seed(0)
    sc = SymmetricContraction(max_ell, l_out, correlation, num_elements=3, channels=4, dtype=torch.float64)
    z = torch.tensor([0, 0, 1, 2, 2])
    a = torch.randn(5, (max_ell + 1) ** 2, 4, dtype=torch.float64)
    out = sc(a, ElementGroups.from_sorted(z, 3))
    assert out.shape == (5, (l_out + 1) ** 2, 4)
    assert torch.allclose(out, _dense_mace(sc, a, z, l_out, correlation, max_ell), atol=1e-12)


def test_weight_shapes_and_init_match_mace():
    torch.manual_seed(0)
    sc = SymmetricContraction(3, 1, 3, num_elements=89, channels=16, dtype=torch.float64)
    shapes = {k: tuple(v.shape) for k, v in sc.weights.items()}
    assert shapes["L0_nu3"] == (89, 23, 16) and shapes["L1_nu3"] == (89, 51, 16) and shapes["L1_nu2"] == (89, 6, 16)
    assert abs(sc.weights["L1_nu3"].std().item() * 51 - 1.0) < 0.05  # randn / K_nu


def test_equivariant_and_zero_at_zero():
    torch.manual_seed(1)
    sc = SymmetricContraction(3, 2, 3, num_elements=2, channels=3, dtype=torch.float64)
    groups = ElementGroups.from_sorted(torch.tensor([0, 1, 1]), 2)
    rot = o3.rand_matrix(dtype=torch.float64)
    d_in = o3.Irreps("0e+1o+2e+3o").D_from_matrix(rot)
    d_out = o3.Irreps("0e+1o+2e").D_from_matrix(rot)
    a = torch.randn(3, 16, 3, dtype=torch.float64)
    rotated = sc(torch.einsum("ij,njc->nic", d_in, a), groups)
    assert torch.allclose(rotated, torch.einsum("ij,njc->nic", d_out, sc(a, groups)), atol=1e-6)
    assert torch.all(sc(torch.zeros_like(a), groups) == 0)


def test_double_backward():
    torch.manual_seed(2)
    sc = SymmetricContraction(2, 1, 3, num_elements=2, channels=2, dtype=torch.float64)
    groups = ElementGroups.from_sorted(torch.tensor([0, 1]), 2)
    a = torch.randn(2, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: sc(x, groups), (a,))
