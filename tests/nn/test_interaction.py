"""Interaction block: equivariance under rotations of the edges, zero without edges, edge order irrelevant."""
import torch
from e3nn import o3

from foundation.nn.interaction import Interaction, PaddedNeighbors
from foundation.nn.radial import BesselCutoff


def _setup(l_in, seed=0):
    torch.manual_seed(seed)
    block = Interaction(l_in, 3, channels=4, num_bessel=6, radial_hidden=[8, 8], dtype=torch.float64)
    basis = BesselCutoff(3.0, 6, 5)
    pos = torch.randn(5, 3, dtype=torch.float64)
    send = torch.tensor([0, 1, 2, 3, 4, 0, 2, 1])
    recv = torch.tensor([1, 0, 0, 0, 0, 2, 4, 3])
    h = torch.randn(5, (l_in + 1) ** 2, 4, dtype=torch.float64)
    return block, basis, pos, send, recv, h


def _run(block, basis, pos, send, recv, h):
    vec = pos[recv] - pos[send]
    sh = o3.spherical_harmonics([0, 1, 2, 3], vec, normalize=True, normalization="component")
    return block(h, sh, basis(vec.norm(dim=1)), PaddedNeighbors.build(send, recv, len(pos)), avg_num_neighbors=2.0)


def test_rotation_equivariance():
    for l_in in (0, 1, 2):
        block, basis, pos, send, recv, h = _setup(l_in)
        rot = o3.rand_matrix(dtype=torch.float64)
        d_in = o3.Irreps("+".join(["0e", "1o", "2e"][:l_in + 1])).D_from_matrix(rot)
        d_out = o3.Irreps("0e+1o+2e+3o").D_from_matrix(rot)
        out = _run(block, basis, pos, send, recv, h)
        out_rot = _run(block, basis, pos @ rot.T, send, recv, torch.einsum("ij,njc->nic", d_in, h))
        assert out.shape == (5, 16, 4)
        assert torch.allclose(out_rot, torch.einsum("ij,njc->nic", d_out, out), atol=1e-6)


def test_edge_order_and_no_edges():
    block, basis, pos, send, recv, h = _setup(1, seed=1)
    perm = torch.randperm(len(send))
    assert torch.allclose(_run(block, basis, pos, send, recv, h), _run(block, basis, pos, send[perm], recv[perm], h))
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.all(_run(block, basis, pos, empty, empty, h) == 0)


def test_matches_dense_message_formula():
    """A_i = linear(sum_j R_ij[p] (cg_p h_j Y_ij)) written out edge by edge with the dense CG table."""
    from cg_reference import conv_table
    block, basis, pos, send, recv, h = _setup(2, seed=3)
    vec = pos[recv] - pos[send]
    sh = o3.spherical_harmonics([0, 1, 2, 3], vec, normalize=True, normalization="component")
    table, path_of, counts = conv_table(2, 3)
    weights = block.radial(basis(vec.norm(dim=1))).view(len(send), -1, 4)
    w = weights[:, torch.tensor(block.radial_index)[path_of]]
    msg = torch.einsum("eb,abo,eac->eoc", sh, table, block.linear_up(h)[send]) * w
    agg = torch.zeros(5, msg.shape[1], 4, dtype=torch.float64).index_add(0, recv, msg)
    out, start = [], 0
    for l3, (count, w) in enumerate(zip(counts, block.linear)):
        width = (2 * l3 + 1) * count
        out.append(agg[:, start:start + width].reshape(5, 2 * l3 + 1, count * 4) @ w / (count * 4) ** 0.5 / 2.0)
        start += width
    assert torch.allclose(_run(block, basis, pos, send, recv, h), torch.cat(out, 1), atol=1e-12)


def test_padded_neighbors_layout():
    send = torch.tensor([3, 0, 1, 2, 0])
    recv = torch.tensor([2, 1, 0, 1, 2])
    nbrs = PaddedNeighbors.build(send, recv, 4)
    assert nbrs.width == 2 and sorted(nbrs.index.tolist()) == [0, 2, 3, 4, 5]
    assert nbrs.sender.view(4, 2)[1].tolist() == [0, 2] and nbrs.sender.view(4, 2)[2].tolist() == [3, 0]
