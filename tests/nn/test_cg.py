"""CG tables: path and tree counts (as MACE), exactness of the symmetric reduction, equivariance."""
import itertools

import pytest
import torch
from cg_reference import conv_table, monomial_index
from e3nn import o3

from foundation.nn import cg


def _irreps(l_max: int) -> o3.Irreps:
    return o3.Irreps("+".join(f"1x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(l_max + 1)))


@pytest.mark.parametrize("L, counts", [(0, (1, 4, 23)), (1, (1, 6, 51)), (2, (1, 7, 65))])
def test_coupling_tree_counts_match_mace(L, counts):
    assert tuple(cg.symmetric_basis(nu, 3, L).shape[-1] for nu in (1, 2, 3)) == counts


def test_conv_path_counts_match_mace():
    assert [len(cg.conv_paths(l, 3)) for l in (0, 1, 2)] == [4, 10, 17]
    _, _, counts = conv_table(1, 3)
    assert counts == [2, 3, 3, 2]


@pytest.mark.parametrize("nu", [2, 3])
def test_symmetrize_is_exact(nu):
    torch.manual_seed(0)
    u = cg.coupling_trees(nu, 1, 1)  # (3, 4, ..., 4, K)
    a = torch.randn(4, dtype=torch.float64)
    dense = u
    for _ in range(nu):
        dense = torch.tensordot(dense, a, dims=([1], [0])) if dense.dim() > 2 else dense
    sym = cg.symmetrize(u, nu)
    mono = torch.tensor([torch.prod(a[list(t)]).item() for t in cg.monomial_tuples(nu, 4)], dtype=torch.float64)
    assert torch.allclose(torch.einsum("mtk,t->mk", sym, mono), dense, atol=1e-12)
    # and the brute-force sum over distinct permutations
    brute = torch.zeros_like(sym)
    for i, t in enumerate(cg.monomial_tuples(nu, 4)):
        for perm in set(itertools.permutations(t)):
            brute[:, i] += u[(slice(None),) + perm]
    assert torch.allclose(brute, sym, atol=1e-12)


def test_monomial_index_builds_products():
    a = torch.randn(5, dtype=torch.float64)
    pairs = torch.stack([a[i] * a[j] for i, j in cg.monomial_tuples(2, 5)])
    prefix, last = monomial_index(3, 5)
    triples = pairs[prefix] * a[last]
    ref = torch.stack([a[i] * a[j] * a[k] for i, j, k in cg.monomial_tuples(3, 5)])
    assert torch.allclose(triples, ref)


@pytest.mark.parametrize("l_in", [0, 1, 2])
def test_conv_table_equivariant(l_in):
    torch.manual_seed(1)
    table, path_of, counts = conv_table(l_in, 3)
    rot = o3.rand_matrix(dtype=torch.float64)
    d_in = _irreps(l_in).D_from_matrix(rot)
    d_y = _irreps(3).D_from_matrix(rot)
    blocks = [torch.kron(o3.Irrep(l, (-1) ** l).D_from_matrix(rot), torch.eye(c, dtype=torch.float64))
              for l, c in enumerate(counts) if c]
    d_mid = torch.block_diag(*blocks)
    x, y = torch.randn(table.shape[0], dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    out = torch.einsum("abo,a,b->o", table, x, y)
    out_rot = torch.einsum("abo,a,b->o", table, d_in @ x, d_y @ y)
    assert torch.allclose(out_rot, d_mid @ out, atol=1e-6)  # e3nn D_from_matrix is accurate to ~1e-7
    assert path_of.max().item() == len(cg.conv_paths(l_in, 3)) - 1


@pytest.mark.parametrize("L", [0, 1, 2])
def test_coupling_trees_equivariant(L):
    torch.manual_seed(2)
    rot = o3.rand_matrix(dtype=torch.float64)
    d16 = _irreps(3).D_from_matrix(rot)
    d_out = o3.Irrep(L, (-1) ** L).D_from_matrix(rot)
    u = cg.coupling_trees(2, 3, L)
    a = torch.randn(16, dtype=torch.float64)
    def f(v):
        return torch.einsum("mabk,a,b->mk", u, v, v)
    assert torch.allclose(f(d16 @ a), d_out @ f(a), atol=1e-6)  # e3nn D_from_matrix is accurate to ~1e-7
