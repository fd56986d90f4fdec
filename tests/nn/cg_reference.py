"""Dense reference tables the tests compare the backbone's fast kernels against (test-only, not shipped).

``conv_table`` is the whole "uvu" convolution as one CG tensor; ``monomial_index`` builds the product monomials
of the symmetric contraction one order at a time.
"""
import torch

from foundation.nn.cg import block, conv_paths, irreps_dim, monomial_tuples, path_cg


def conv_table(l_in: int, max_ell: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Dense CG table of the "uvu" convolution with MACE's component normalisation.

    Returns ``cg`` (D_in, D_Y, D_mid) float64 with entries sqrt(2 l3 + 1) w3j(l1,l2,l3)[m1,m2,M],
    ``path_of`` (D_mid,) the path index of each message component, and ``counts`` = paths per l3.
    The message layout groups components by l3; inside an l3 group the index is M * P_l3 + p_local, so that
    a (n, (2 l3 + 1) * P_l3, C) slice views as (n, 2 l3 + 1, P_l3 * C) for the following linear map.
    """
    paths = conv_paths(l_in, max_ell)
    counts = [sum(1 for p in paths if p[2] == l3) for l3 in range(max_ell + 1)]
    d_mid = sum(c * (2 * l3 + 1) for l3, c in enumerate(counts))
    cg = torch.zeros(irreps_dim(l_in), irreps_dim(max_ell), d_mid, dtype=torch.float64)
    path_of = torch.zeros(d_mid, dtype=torch.long)
    offset, local = 0, 0
    for k, (l1, l2, l3) in enumerate(paths):
        if k > 0 and l3 != paths[k - 1][2]:
            offset += counts[paths[k - 1][2]] * (2 * paths[k - 1][2] + 1)
            local = 0
        p_l3 = counts[l3]
        cols = [offset + m * p_l3 + local for m in range(2 * l3 + 1)]
        cg[block(l1), block(l2), cols] = path_cg(l1, l2, l3)
        path_of[cols] = k
        local += 1
    return cg, path_of, counts


def monomial_index(nu: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the order-nu monomials: (index of the order-(nu-1) prefix tuple, index of the last component).

    m_nu[t] = m_{nu-1}[prefix[t]] * A[last[t]], with tuples in ``monomial_tuples`` order.
    """
    prev = {t: i for i, t in enumerate(monomial_tuples(nu - 1, d))}
    tuples = monomial_tuples(nu, d)
    prefix = torch.tensor([prev[t[:-1]] for t in tuples], dtype=torch.long)
    last = torch.tensor([t[-1] for t in tuples], dtype=torch.long)
    return prefix, last
