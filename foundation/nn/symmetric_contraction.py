"""ACE product basis (MACE's symmetric contraction), computed exactly on the reduced symmetric monomial basis.

MACE:  B[i, LM, c] = sum_nu sum_k W_nu[z_i, k, c] sum_{a_1..a_nu} U_nu[M, a_1..a_nu, k] prod_xi A[i, a_xi, c]
with U_nu the (unreduced) generalised CG of every coupling tree (``cg.coupling_trees``) and W_nu of shape
(N_el, K_nu, C), initialised N(0,1)/K_nu -- the same parameters and parameter count as MACE.

Here the sum over index tuples runs over sorted tuples only (the product of A's is symmetric), with U summed
over the distinct permutations of each tuple (``cg.symmetrize``), and only over the monomials whose row is not
zero for some output L (94 of 968 for L=0, correlation 3). Per element present in the batch the coefficients
T_e[t, LM, c] = sum_k U_sym[M, t, k] W[e, k, c] are formed once, then each node needs one multiply-add per
(monomial, output component, channel). Plain torch ops: double backward works.
"""
from __future__ import annotations

import torch
from torch import nn

from .cg import irreps_dim, monomial_tuples, symmetric_basis
from .linear import ElementGroups

_TOL = 1e-12


class SymmetricContraction(nn.Module):
    """(n, (max_ell+1)^2, C) aggregated messages -> (n, (L_out+1)^2, C) product-basis features.

    Parameters ``weights["L{L}_nu{nu}"]`` of shape (N_el, K_nu, C) for L = 0..L_out, nu = 1..correlation.
    """

    def __init__(self, max_ell: int, l_out: int, correlation: int, num_elements: int, channels: int,
                 dtype: torch.dtype):
        super().__init__()
        if not 1 <= correlation <= 3:
            raise ValueError(f"correlation must be 1, 2 or 3, got {correlation}")
        d = irreps_dim(max_ell)
        self.l_out, self.correlation = l_out, correlation
        bases = {(L, nu): symmetric_basis(nu, max_ell, L) for L in range(l_out + 1) for nu in range(1, correlation + 1)}
        self.weights = nn.ParameterDict({
            f"L{L}_nu{nu}": nn.Parameter(torch.randn(num_elements, u.shape[-1], channels, dtype=dtype) / u.shape[-1])
            for (L, nu), u in bases.items()})
        used = {nu: sorted({t for L in range(l_out + 1)
                            for t in _used_rows(bases[(L, nu)], nu, d)}) for nu in range(1, correlation + 1)}
        used[1] = [(a,) for a in range(d)]
        if correlation >= 3:  # pairs needed as prefixes of the triples
            used[2] = sorted(set(used[2]) | {t[:-1] for t in used[3]})
        position = {nu: {t: i for i, t in enumerate(monomial_tuples(nu, d))} for nu in used}
        rows = {nu: [position[nu][t] for t in used[nu]] for nu in used}
        if correlation >= 2:
            self.register_buffer("pair_a", torch.tensor([t[0] for t in used[2]]), persistent=False)
            self.register_buffer("pair_b", torch.tensor([t[1] for t in used[2]]), persistent=False)
        if correlation >= 3:
            pos2 = {t: i for i, t in enumerate(used[2])}
            self.register_buffer("trip_prefix", torch.tensor([pos2[t[:2]] for t in used[3]]), persistent=False)
            self.register_buffer("trip_last", torch.tensor([t[2] for t in used[3]]), persistent=False)
        for (L, nu), u in bases.items():
            self.register_buffer(f"u_L{L}_nu{nu}", u[:, rows[nu], :].to(dtype), persistent=False)
        self.num_monomials = sum(len(v) for v in used.values())

    def monomials(self, a: torch.Tensor) -> list[torch.Tensor]:
        """a (d, C, n) -> products of nu = 1..correlation components, one (num_monomials_nu, C, n) per nu.

        The monomial index is the leading dimension so that gathers copy whole contiguous rows and their
        backward is a row-wise index_add. The orders are kept apart (no concatenation to differentiate).
        """
        parts = [a]
        if self.correlation >= 2:
            parts.append(a.index_select(0, self.pair_a) * a.index_select(0, self.pair_b))
        if self.correlation >= 3:
            parts.append(parts[1].index_select(0, self.trip_prefix) * a.index_select(0, self.trip_last))
        return parts

    def coefficients(self, elements: list[int]) -> list[torch.Tensor]:
        """Per nu: T_nu (len(elements), C, (L_out+1)^2, num_monomials_nu) = sum_k U_sym W[e] for the elements."""
        idx = torch.tensor(elements, device=self.weights["L0_nu1"].device)
        return [torch.cat([torch.einsum("mtk,ekc->ecmt", getattr(self, f"u_L{L}_nu{nu}"),
                                        self.weights[f"L{L}_nu{nu}"][idx]) for L in range(self.l_out + 1)], dim=2)
                for nu in range(1, self.correlation + 1)]

    def forward(self, a: torch.Tensor, groups: ElementGroups) -> torch.Tensor:
        """a (n, d, C) on element-sorted nodes -> (n, (L_out+1)^2, C)."""
        if not groups.slices:
            return a.new_zeros(0, irreps_dim(self.l_out), a.shape[-1])
        monomials = [m.transpose(0, 1) for m in self.monomials(a.permute(1, 2, 0).contiguous())]  # (C, T_nu, n)
        coeffs = self.coefficients([e for e, _, _ in groups.slices])
        sizes = [stop - start for _, start, stop in groups.slices]
        per_group = list(zip(*[m.split(sizes, dim=2) for m in monomials]))  # no zero-filled slice gradients
        pieces = []
        for k, group in enumerate(per_group):
            terms = [torch.bmm(t[k], m) for t, m in zip(coeffs, group)]
            pieces.append(sum(terms[1:], terms[0]))  # (C, M, n_e)
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)  # (C, M, n)
        return out.permute(2, 1, 0)


def _used_rows(u: torch.Tensor, nu: int, d: int) -> list[tuple[int, ...]]:
    """Sorted tuples whose symmetrised U row is non-zero for some (M, k)."""
    tuples = monomial_tuples(nu, d)
    nonzero = (u.abs() > _TOL).any(dim=2).any(dim=0)
    return [tuples[i] for i in torch.nonzero(nonzero).flatten().tolist()]
