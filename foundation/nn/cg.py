"""Clebsch-Gordan tables: convolution paths, generalised CG (ACE coupling trees) and the reduced symmetric basis.

Irreps of the backbone all have "natural" parity (-1)^l, so an irrep is named by l alone. Features are stored
as (n, D, C) with D = (l_max+1)^2 components in e3nn order (l-major, m = -l..l inside a block) and C channels.
All tables are built once (float64, then cast) from e3nn's real Wigner 3j symbols.
"""
from __future__ import annotations

import itertools
import math
from functools import cache

import torch
from e3nn import o3


def irreps_dim(l_max: int) -> int:
    """Number of components of 0e + 1o + ... + l_max: (l_max+1)^2."""
    return (l_max + 1) ** 2


def block(l: int) -> slice:
    """Component slice of the order-l block inside a (l_max+1)^2 layout."""
    return slice(l * l, (l + 1) * (l + 1))


def conv_paths(l_in: int, max_ell: int) -> list[tuple[int, int, int]]:
    """Convolution paths (l1 of h, l2 of Y, l3 of the message), parity-allowed, l3 <= max_ell.

    Sorted by l3, then l1, then l2 (the layout of the aggregated messages). For l_in = 0 and max_ell = 3 there
    are 4 paths; l_in = 1: 10; l_in = 2: 17 (as MACE's ``tp_out_irreps_with_instructions``).
    """
    paths = [(l1, l2, l3) for l1 in range(l_in + 1) for l2 in range(max_ell + 1)
             for l3 in range(abs(l1 - l2), min(l1 + l2, max_ell) + 1) if (l1 + l2 + l3) % 2 == 0]
    return sorted(paths, key=lambda p: (p[2], p[0], p[1]))


@cache
def _w3j(l1: int, l2: int, l3: int) -> torch.Tensor:
    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64)


def path_cg(l1: int, l2: int, l3: int) -> torch.Tensor:
    """CG block of one convolution path, (2 l1 + 1, 2 l2 + 1, 2 l3 + 1) float64: sqrt(2 l3 + 1) w3j(l1, l2, l3)."""
    return math.sqrt(2 * l3 + 1) * _w3j(l1, l2, l3)


def coupling_trees(nu: int, max_ell: int, L: int) -> torch.Tensor:
    """Generalised CG of every left-to-right coupling tree of nu copies of 0e+...+max_ell ending in irrep L.

    Returns U of shape (2L+1, D, ..., D, K) (nu copies of D = (max_ell+1)^2), one column per tree, built from
    chained w3j(l_out, l_left, l_right) * sqrt(2 l_out + 1) (MACE's ``U_matrix_real``, unreduced: K = 1, 4, 23
    for L=0; 1, 6, 51 for L=1; 1, 7, 65 for L=2 at max_ell=3 and nu = 1, 2, 3). Intermediate irreps keep
    their parity, so e.g. 1o x 1o -> 1e is an allowed intermediate but not a final L=1 (odd) output.
    """
    d = irreps_dim(max_ell)
    trees = []  # (l, parity, tensor (2l+1, d^k))
    for l in range(max_ell + 1):
        g = torch.zeros(2 * l + 1, d, dtype=torch.float64)
        g[:, block(l)] = torch.eye(2 * l + 1, dtype=torch.float64)
        trees.append((l, (-1) ** l, g))
    for level in range(nu - 1):
        last = level == nu - 2
        new = []
        for l_left, p_left, g_left in trees:
            for l_r in range(max_ell + 1):
                for l_out in range(abs(l_left - l_r), l_left + l_r + 1):
                    if last and (l_out != L or p_left * (-1) ** l_r != (-1) ** L):
                        continue  # only the final level is filtered; the tree order is unchanged
                    c = _w3j(l_out, l_left, l_r) * math.sqrt(2 * l_out + 1)  # (o, a, b)
                    g = torch.einsum("oab,ax->oxb", c, g_left)  # (o, d^k, 2 l_r + 1)
                    full = torch.zeros(g.shape[0], g.shape[1], d, dtype=torch.float64)
                    full[:, :, block(l_r)] = g
                    new.append((l_out, p_left * (-1) ** l_r, full.reshape(g.shape[0], -1)))
        trees = sorted(new, key=lambda t: (t[0], t[1]))  # stable, like e3nn's sorted irreps
    chosen = [g for l, p, g in trees if l == L and p == (-1) ** L]
    if not chosen:
        return torch.zeros((2 * L + 1,) + (d,) * nu + (0,), dtype=torch.float64)
    return torch.stack(chosen, dim=-1).reshape((2 * L + 1,) + (d,) * nu + (len(chosen),))


def monomial_tuples(nu: int, d: int) -> list[tuple[int, ...]]:
    """Sorted index tuples a1 <= ... <= a_nu over d components (816 for nu=3, d=16)."""
    return list(itertools.combinations_with_replacement(range(d), nu))


@cache
def symmetric_basis(nu: int, max_ell: int, L: int) -> torch.Tensor:
    """``symmetrize(coupling_trees(nu, max_ell, L), nu)``: (2L+1, n_tuples, K_nu) float64, cached per process."""
    return symmetrize(coupling_trees(nu, max_ell, L), nu)


def symmetrize(u: torch.Tensor, nu: int) -> torch.Tensor:
    """Reduce U (M, d, ..., d, K) to the symmetric monomial basis: (M, n_tuples, K).

    Row t of the result is the sum of U over the distinct permutations of tuple t, so that
    sum_{a} U[M, a, k] prod_xi A[a_xi] = sum_t U_sym[M, t, k] prod_{a in t} A[a] exactly.
    """
    d = u.shape[1]
    total = sum(u.permute(0, *(1 + i for i in perm), nu + 1) for perm in itertools.permutations(range(nu)))
    tuples = monomial_tuples(nu, d)
    idx = torch.tensor(tuples, dtype=torch.long).reshape(-1, nu)
    distinct = torch.tensor([len(set(itertools.permutations(t))) for t in tuples], dtype=u.dtype)
    picked = total[(slice(None),) + tuple(idx[:, i] for i in range(nu))]  # (M, n_tuples, K)
    return (picked * (distinct / math.factorial(nu)).view(1, -1, 1)).contiguous()
