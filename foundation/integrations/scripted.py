"""TorchScript-compatible copy of ``FoundationModel`` for one readout head (the body of the deployable artifact).

``ScriptedModel(model, head_index)`` copies the weights of a ``FoundationModel`` into modules that
``torch.jit.script`` accepts and folds everything that is constant once the head is fixed: per-layer weight scales,
the product-basis coefficients T_e = sum_k U W[e] of every element, the head's readout weights, the isolated-atom
readouts R_iso[z] and the head's E0 / scale / shift. The computation is the backbone's, step by step
(``foundation.model.backbone``): nodes sorted by element, per-element GEMMs, the same contraction order, so a
float64 artifact reproduces the model to rounding, with the same padded neighbour table for the convolution.
Long-range charges: ``scripted_lr``.
"""
import math

import torch
from e3nn import o3
from torch import Tensor, nn

from ..model.backbone import FoundationModel
from ..nn.linear import ElementGroups
from ..nn.radial import SILU_NORM


class Dense(nn.Module):
    """x @ W with a fixed (pre-scaled) weight buffer, optionally followed by the normalised silu."""

    def __init__(self, weight: Tensor, act: bool):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.act, self.silu_norm = act, SILU_NORM

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return self.silu_norm * torch.nn.functional.silu(y) if self.act else y


class PerL(nn.Module):
    """Per-l channel mixing with weights W (L+1, C_in, C_out) (``IrrepsLinear``, scale folded in)."""

    def __init__(self, weights: Tensor):
        super().__init__()
        self.register_buffer("weight", weights.detach().clone())
        self.l_max = weights.shape[0] - 1

    def forward(self, x: Tensor) -> Tensor:
        if self.l_max == 0:
            return x @ self.weight[0]
        parts = [x[:, l * l:(l + 1) * (l + 1)] @ self.weight[l] for l in range(self.l_max + 1)]
        return torch.cat(parts, dim=1)


class PerElement(nn.Module):
    """Per-element, per-l channel mixing on element-sorted nodes (``ElementLinear``), W (L+1, N_el, C, C')."""

    def __init__(self, weights: Tensor):
        super().__init__()
        self.register_buffer("weight", weights.detach().clone())
        self.l_max = weights.shape[0] - 1

    def forward(self, x: Tensor, slices: list[tuple[int, int, int]]) -> Tensor:
        pieces: list[Tensor] = []
        for e, start, stop in slices:
            xs = x[start:stop]
            if self.l_max == 0:
                pieces.append(xs[:, :1] @ self.weight[0, e])
            else:
                pieces.append(torch.cat([xs[:, l * l:(l + 1) * (l + 1)] @ self.weight[l, e]
                                         for l in range(self.l_max + 1)], dim=1))
        if len(pieces) == 0:
            return x.new_zeros(0, (self.l_max + 1) * (self.l_max + 1), self.weight.shape[-1])
        return torch.cat(pieces, dim=0)


class PathGroup(nn.Module):
    """The convolution paths of one (l1, l3) pair: coupling table (D_Y, P d1 d3), radial columns [offset, offset+P)."""

    def __init__(self, table: Tensor, l1: int, l3: int, paths: int, offset: int):
        super().__init__()
        self.register_buffer("table", table.detach().clone())
        self.l1, self.l3, self.paths, self.offset = l1, l3, paths, offset

    def forward(self, sh: Tensor, radial: Tensor, h_send: Tensor, n: int, k: int) -> Tensor:
        """On the padded (n, K) neighbour table: sh (nK, D_Y), radial (nK, P_tot, C), h_send (nK, D_in, C)
        -> messages summed per receiver (P, n, d3, C), one batched GEMM over neighbours and m1."""
        p, d1, d3, c = self.paths, 2 * self.l1 + 1, 2 * self.l3 + 1, radial.shape[-1]
        coupling = (sh @ self.table).view(n, k, p, d1, d3).permute(2, 0, 4, 1, 3).reshape(p * n, d3, k * d1)
        h = h_send[:, self.l1 * self.l1:(self.l1 + 1) * (self.l1 + 1)]
        weights = radial[:, self.offset:self.offset + p].transpose(0, 1).contiguous()  # (P, nK, C)
        x = weights.unsqueeze(2) * h.unsqueeze(0)  # (P, nK, d1, C)
        return torch.bmm(coupling, x.reshape(p * n, k * d1, c)).view(p, n, d3, c)


def padded_neighbors(sender: Tensor, receiver: Tensor, n: int) -> tuple[Tensor, Tensor, int]:
    """Edges in a (n, K) table per receiver (``nn.interaction.PaddedNeighbors``): slot (E,) of each edge in the
    flat table, sender (nK,) of each slot (0 when empty), K = the largest in-degree."""
    degree = torch.bincount(receiver, minlength=n)
    width = int(degree.max()) if receiver.numel() > 0 else 0
    order = torch.argsort(receiver, stable=True)
    start = torch.cumsum(degree, 0) - degree
    slot = torch.empty_like(receiver)
    slot[order] = torch.arange(receiver.numel(), device=receiver.device) - start[receiver[order]]
    index = receiver * width + slot
    send = torch.zeros(n * width, dtype=sender.dtype, device=sender.device).index_copy(0, index, sender)
    return index, send, width


def pad(x: Tensor, index: Tensor, rows: int) -> Tensor:
    """Edge values (E, ...) -> (rows = nK, ...) with zeros in empty slots."""
    shape = [rows] + list(x.shape[1:])
    return torch.zeros(shape, dtype=x.dtype, device=x.device).index_copy(0, index, x)


class ScriptInteraction(nn.Module):
    """``nn.interaction.Interaction`` with messages summed per receiver: h (n, D_in, C) -> A (n, D_Y, C)."""

    def __init__(self, block, avg_num_neighbors: float):
        super().__init__()
        self.channels, self.max_ell = block.channels, block.max_ell
        self.linear_up = PerL(torch.stack([w * block.linear_up.scale for w in block.linear_up.weights]))
        last = len(block.radial.weights) - 1
        self.radial = nn.ModuleList([Dense(w * s, i < last) for i, (w, s) in
                                     enumerate(zip(block.radial.weights, block.radial.scales))])
        groups, offset = [], 0
        for g, ((l1, l3), l2s) in enumerate(zip(block.groups, block.group_l2)):
            groups.append(PathGroup(getattr(block, f"cg_{g}"), l1, l3, len(l2s), offset))
            offset += len(l2s)
        self.groups, self.num_paths = nn.ModuleList(groups), offset
        self.linear = nn.ModuleList([
            Dense(w / (math.sqrt(count * block.channels) * avg_num_neighbors), False)
            for count, w in zip(block.counts, block.linear)])

    def forward(self, h: Tensor, sh: Tensor, edge_feats: Tensor, index: Tensor, send: Tensor, k: int) -> Tensor:
        """h (n, D_in, C), sh (E, D_Y), edge_feats (E, num_bessel), padded table (``padded_neighbors``)."""
        n, c = h.shape[0], self.channels
        rows = n * k
        small = rows <= 1.25 * edge_feats.shape[0]  # little padding: run the MLP on padded rows (MLP(0) = 0)
        radial = pad(edge_feats, index, rows) if small else edge_feats
        for layer in self.radial:
            radial = layer(radial)
        if not small:
            radial = pad(radial, index, rows)
        radial = radial.view(rows, self.num_paths, c)
        sh_pad = pad(sh, index, rows)
        h_send = self.linear_up(h)[send]
        per_l3: list[list[Tensor]] = []
        for _ in range(self.max_ell + 1):
            per_l3.append([])
        for group in self.groups:
            per_l3[group.l3].append(group(sh_pad, radial, h_send, n, k))
        result: list[Tensor] = []
        for l3, linear in enumerate(self.linear):
            x = torch.cat(per_l3[l3], dim=0).permute(1, 2, 0, 3).reshape(n, 2 * l3 + 1, -1)  # (n, d3, P_l3 C)
            result.append(linear(x))
        return torch.cat(result, dim=1)


class ScriptProduct(nn.Module):
    """``SymmetricContraction`` with the coefficients of every element precomputed: (n, D, C) -> (n, (L+1)^2, C)."""

    def __init__(self, block):
        super().__init__()
        self.correlation, self.l_out = block.correlation, block.l_out
        empty = torch.zeros(0, dtype=torch.long)
        for name in ("pair_a", "pair_b", "trip_prefix", "trip_last"):
            self.register_buffer(name, getattr(block, name, empty).clone())
        every = list(range(block.weights["L0_nu1"].shape[0]))
        with torch.no_grad():
            coeffs = block.coefficients(every)  # per nu: (N_el, C, M, T_nu)
        for nu in range(3):
            self.register_buffer(f"coeff{nu + 1}", coeffs[nu].clone() if nu < len(coeffs) else torch.zeros(0))

    def forward(self, a: Tensor, slices: list[tuple[int, int, int]]) -> Tensor:
        if len(slices) == 0:
            return a.new_zeros(0, (self.l_out + 1) * (self.l_out + 1), a.shape[-1])
        at = a.permute(1, 2, 0).contiguous()  # (d, C, n)
        mono = [at.transpose(0, 1)]
        coeffs = [self.coeff1]
        if self.correlation >= 2:
            pairs = at.index_select(0, self.pair_a) * at.index_select(0, self.pair_b)
            mono.append(pairs.transpose(0, 1))
            coeffs.append(self.coeff2)
            if self.correlation >= 3:
                triples = pairs.index_select(0, self.trip_prefix) * at.index_select(0, self.trip_last)
                mono.append(triples.transpose(0, 1))
                coeffs.append(self.coeff3)
        pieces: list[Tensor] = []
        for e, start, stop in slices:
            out = torch.bmm(coeffs[0][e], mono[0][:, :, start:stop])
            for k in range(1, len(mono)):
                out = out + torch.bmm(coeffs[k][e], mono[k][:, :, start:stop])
            pieces.append(out)
        return torch.cat(pieces, dim=2).permute(2, 1, 0)


class ScriptLayer(nn.Module):
    """One backbone layer: skip, interaction, product basis, linear, and the head's readout (n,)."""

    def __init__(self, model: FoundationModel, t: int, head: int):
        super().__init__()
        cfg = model.config
        skip, read = model.skips[t], model.readouts[t]
        self.skip = PerElement(torch.stack([w * skip.scale for w in skip.weights]))
        self.interaction = ScriptInteraction(model.interactions[t], cfg.avg_num_neighbors)
        self.product = ScriptProduct(model.products[t])
        self.linear = PerL(torch.stack([w * model.product_linears[t].scale for w in model.product_linears[t].weights]))
        self.nonlinear, self.silu_norm = hasattr(read, "weight_in"), SILU_NORM
        if self.nonlinear:
            self.register_buffer("w_in", (read.weight_in[head] * read.scale_in).detach().clone())
            self.register_buffer("w_out", (read.weight_out[head] * read.scale_out).detach().clone())
        else:
            self.register_buffer("w_in", (read.weight[:, head] * read.scale).detach().clone())
            self.register_buffer("w_out", torch.zeros(0))

    def forward(self, h: Tensor, sh: Tensor, edge_feats: Tensor, index: Tensor, send: Tensor, k: int,
                slices: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
        sc = self.skip(h, slices)
        a = self.interaction(h, sh, edge_feats, index, send, k)
        h = self.linear(self.product(a, slices))
        if sc.shape[1] == h.shape[1]:
            h = h + sc
        else:
            h = torch.cat([h[:, :sc.shape[1]] + sc, h[:, sc.shape[1]:]], dim=1)
        x = h[:, 0, :]
        if self.nonlinear:
            readout = (self.silu_norm * torch.nn.functional.silu(x @ self.w_in) * self.w_out).sum(-1)
        else:
            readout = x @ self.w_in
        return h, readout


class ShortRange(nn.Module):
    """Per-atom short-range energies (n,) eV and last-layer invariant features (n, C) of one head."""

    def __init__(self, model: FoundationModel, head: int):
        super().__init__()
        cfg = model.config
        self.num_elements = len(cfg.elements)
        self.r_max, self.p = float(cfg.r_max), int(cfg.num_poly_cutoff)
        self.prefactor = math.sqrt(2.0 / cfg.r_max)
        self.register_buffer("freq", model.radial_basis.freq.to(model.dtype).clone())
        self.sh = o3.SphericalHarmonics(list(range(cfg.max_ell + 1)), normalize=True, normalization="component")
        self.register_buffer("embedding", (model.embedding.weight * model.embedding.scale).detach().clone())
        emb = model.charge_embedding
        self.max_charge = emb.max_charge if emb is not None else 0
        self.register_buffer("charge_table", (emb.weight - emb.weight[emb.max_charge]).detach().clone()
                             if emb is not None else torch.zeros(0))
        self.layers = nn.ModuleList([ScriptLayer(model, t, head) for t in range(cfg.num_layers)])
        every = ElementGroups(tuple((e, e, e + 1) for e in range(len(cfg.elements))))
        with torch.no_grad():
            iso = model._isolated_readouts(every)[:, head]
        stats = model.statistics
        self.register_buffer("iso", iso.detach().clone())
        self.register_buffer("e0", stats.e0[head].detach().to(stats.scale.dtype).clone())  # E0 is float64 in the model
        self.scale, self.shift = float(stats.scale[head]), float(stats.shift[head])

    def envelope(self, r: Tensor) -> Tensor:
        p, x = float(self.p), r / self.r_max
        f = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(self.p) + p * (p + 2.0) * x.pow(self.p + 1)
             - p * (p + 1.0) / 2.0 * x.pow(self.p + 2))
        return f * (x < 1.0).to(r.dtype)

    def forward(self, z: Tensor, vectors: Tensor, sender: Tensor, receiver: Tensor, charge_per_atom: Tensor
                ) -> tuple[Tensor, Tensor]:
        """z (n,) element index, vectors (E,3) Å = pos[receiver] - pos[sender] + shifts, charge_per_atom (n,) e."""
        order, rank, slices, index, send, k = self.prepare(z, sender, receiver)
        return self.energies(z, vectors, receiver, charge_per_atom, order, rank, index, send, k, slices)

    def prepare(self, z: Tensor, sender: Tensor, receiver: Tensor
                ) -> tuple[Tensor, Tensor, list[tuple[int, int, int]], Tensor, Tensor, int]:
        """The data-dependent tables (no gradient flows through them): element order (n,) and its inverse rank (n,),
        per-element slices (element, start, stop) of the sorted nodes, the padded neighbour table (index (E,),
        send (nK,), K) of ``padded_neighbors`` in sorted node numbering."""
        order = torch.argsort(z, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        counts: list[int] = torch.bincount(z, minlength=self.num_elements).tolist()
        slices: list[tuple[int, int, int]] = []
        start = 0
        for e, c in enumerate(counts):
            if c > 0:
                slices.append((e, start, start + c))
                start += c
        index, send, k = padded_neighbors(rank[sender], rank[receiver], z.shape[0])
        return order, rank, slices, index, send, k

    def energies(self, z: Tensor, vectors: Tensor, receiver: Tensor, charge_per_atom: Tensor, order: Tensor,
                 rank: Tensor, index: Tensor, send: Tensor, k: int, slices: list[tuple[int, int, int]]
                 ) -> tuple[Tensor, Tensor]:
        """Per-atom energies (n,) eV and invariant features (n, C) from edge vectors (E,3) Å and ``prepare``'s
        tables: the differentiable part (what ``foundation.integrations.compiled`` compiles)."""
        lengths = torch.linalg.norm(vectors, dim=-1)
        r1 = lengths.unsqueeze(-1)
        edge_feats = self.prefactor * torch.sin(self.freq * r1) / r1 * self.envelope(lengths).unsqueeze(-1)
        sh = self.sh(vectors)
        coordination = torch.zeros(z.shape[0], dtype=vectors.dtype, device=vectors.device).index_add(
            0, receiver, self.envelope(lengths))
        h = self.embedding[z[order]].unsqueeze(1)
        if self.max_charge > 0:
            h = h + self.charge_embedding(charge_per_atom[order]).unsqueeze(1)
        readout = torch.zeros(z.shape[0], dtype=vectors.dtype, device=vectors.device)
        for layer in self.layers:
            h, r = layer(h, sh, edge_feats, index, send, k, slices)
            readout = readout + r
        readout = readout[rank]
        presence = torch.tanh(coordination)
        energy = self.e0[z] + self.scale * (readout - (1.0 - presence) * self.iso[z]) + self.shift * presence
        return energy, h[:, 0, :][rank]

    def charge_embedding(self, charge: Tensor) -> Tensor:
        """Total charge per atom (n,) e -> (n, C); ValueError-like error for non-integer or out-of-range charges."""
        index = torch.round(charge)
        bad = ((index - charge).abs() > 1e-6) | (index.abs() > self.max_charge)
        if bool(bad.any()):
            raise ValueError("total_charge must be an integer between -" + str(self.max_charge) + " and "
                             + str(self.max_charge) + " e for this model (ModelConfig.max_total_charge)")
        return self.charge_table[index.long() + self.max_charge]
