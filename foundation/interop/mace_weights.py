"""mace-torch state_dict (from a dump) -> the backbone's state_dict, tensor by tensor, with shape checks.

Conventions that make the map exact (e3nn 0.4.4 layouts; C channels, N_el elements, H heads):
- o3.Linear weights are flat concatenations of (mul_in, mul_out) blocks in instruction order; the backbone
  keeps one (C_in, C_out) matrix per l with the same 1/sqrt(fan_in) factor.
- the skip FullyConnectedTensorProduct(h, N_el x 0e, H) stores (C, N_el, C) blocks per l; ours are (N_el, C, C).
- the radial MLP's output columns follow mace's convolution instructions ((l1, l2, l3) in e3nn order), ours
  are grouped by (l1, l3); the map is ``Interaction.radial_index``.
- e3nn 0.4.4's silu normalisation constant is a Monte-Carlo estimate (~1.6765); ours is exact (~1.67653).
  The ratio is absorbed into the weight matrix that follows each activation (radial MLP, readout MLP).
- the symmetric contraction weights are expressed in mace's U basis; ``contraction_weights`` maps them to ours
  through the symmetrised U matrices (identity when the bases agree, a least-squares change of basis otherwise).
"""
from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..nn.cg import conv_paths, coupling_trees, symmetric_basis, symmetrize
from ..nn.radial import SILU_NORM


def act_ratio(act: float) -> float:
    """mace's e3nn silu constant / ours: the factor on each weight matrix that follows a silu (import multiplies
    by it, export divides by the same float, so the round trip costs at most one rounding)."""
    return act / SILU_NORM


def readout_factor(act: float, hidden: int, n_heads: int) -> float:
    """mace linear_2 (fan-in H x hidden) -> our per-head readout (fan-in hidden): act_ratio x sqrt(1 / H)."""
    return act_ratio(act) * (hidden / (hidden * n_heads)) ** 0.5


def grouped_paths(paths: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Our order of the convolution paths (l1, l2, l3) in the radial MLP's output columns: grouped by (l1, l3), then
    l2; ``paths`` is mace's instruction order (sorted by l3, then l1, l2)."""
    return [(l1, l2, l3) for l1, l3 in sorted({(p[0], p[2]) for p in paths})
            for l2 in sorted(p[1] for p in paths if (p[0], p[2]) == (l1, l3))]


def _get(tensors: dict, key: str, shape: tuple | None = None) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"model.safetensors of the dump has no tensor {key!r}; the dump is incomplete or from "
                         "another model type: re-run the dumper on the .model file")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape) and t.numel() != _numel(shape):
        raise ValueError(f"model.safetensors tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                         "for the hyperparameters in hyper.json; the dump's two files do not belong together")
    return t.to(torch.float64)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _linear_blocks(flat: torch.Tensor, blocks: list[tuple[int, int]], key: str) -> list[torch.Tensor]:
    """Split an o3.Linear flat weight into (mul_in, mul_out) matrices."""
    total = sum(a * b for a, b in blocks)
    if flat.numel() != total:
        raise ValueError(f"model.safetensors tensor {key!r} has {flat.numel()} values, expected {total} "
                         f"({blocks}); the dump's two files do not belong together")
    out, start = [], 0
    for a, b in blocks:
        out.append(flat.reshape(-1)[start:start + a * b].reshape(a, b))
        start += a * b
    return out


def w3j_signs(signature: dict) -> dict:
    """{(a, b, c): +-1}: sign of the dumping e3nn's wigner_3j(a, b, c) relative to ours, from hyper.json."""
    from ..nn.cg import _w3j
    signs = {}
    for key, (index, value) in signature.items():
        a, b, c = (int(x) for x in key.split(","))
        ours = float(_w3j(a, b, c).flatten()[int(index)])
        if abs(ours - value) <= 1e-9 * max(1.0, abs(value)):
            continue
        if abs(ours + value) <= 1e-9 * max(1.0, abs(value)):
            signs[(a, b, c)] = -1
        else:
            from .mace_hyper import refuse
            refuse(f"e3nn wigner_3j({a}, {b}, {c}) convention", "differs from ours beyond a sign")
    return signs


def contraction_weights(u_mace: torch.Tensor, w_mace: torch.Tensor, nu: int, max_ell: int, L: int,
                        key: str) -> torch.Tensor:
    """mace weights (N_el, K_mace, C) on U_mace (2L+1, d, ..., d, K_mace) -> ours (N_el, K_ours, C) on
    ``symmetric_basis(nu, max_ell, L)``: a signed permutation when the symmetrised columns agree up to sign
    (exact), otherwise a least-squares change of basis U_ours_sym X = U_mace_sym with a residual check."""
    u = u_mace.to(torch.float64)
    base = symmetric_basis(nu, max_ell, L)
    if not bool(u.abs().max() > 0):  # a coupling with no allowed tree: mace keeps an empty weight
        return w_mace.new_zeros(w_mace.shape[0], base.shape[-1], w_mace.shape[-1])
    mace_sym = symmetrize(u, nu).reshape(-1, u.shape[-1])  # (M * tuples, K_mace)
    ours = base.reshape(-1, base.shape[-1])
    tol = 1e-9 * float(mace_sym.abs().max())
    if ours.shape == mace_sym.shape:
        same = ((ours - mace_sym).abs() <= tol).all(dim=0)
        flipped = ((ours + mace_sym).abs() <= tol).all(dim=0)
        if bool((same | flipped).all()):
            sign = torch.where(same, 1.0, -1.0).to(torch.float64)
            return w_mace.to(torch.float64) * sign.view(1, -1, 1)
    x = torch.linalg.lstsq(ours, mace_sym, driver="gelsd").solution  # (K_ours, K_mace)
    residual = (ours @ x - mace_sym).abs().max()
    if residual > 1e-10 * mace_sym.abs().max():
        raise ValueError(f"{key}: mace's U matrix (nu={nu}, L={L}) spans a space the backbone's product basis "
                         f"does not (residual {float(residual):.2e}); this contraction cannot be imported")
    return torch.einsum("ok,ekc->eoc", x, w_mace.to(torch.float64))


def _contractions(tensors: dict, cfg: ModelConfig, layer: int, l_out: int, n_el: int, bases: dict,
                  signs: dict) -> dict:
    """Product-basis weights of one layer. ``bases[U key]`` is "unreduced" (mace's unreduced generalised CG, the
    backbone's own basis: the dumper verified it and dropped the buffer) or "stored" (the U is in the dump)."""
    out, c = {}, cfg.num_channels
    for L in range(l_out + 1):
        prefix = f"products.{layer}.symmetric_contractions.contractions.{L}"
        for nu in range(1, cfg.correlation + 1):
            ukey = f"{prefix}.U_matrix_{nu}"
            wkey = f"{prefix}.weights_max" if nu == cfg.correlation else f"{prefix}.weights.{cfg.correlation - 1 - nu}"
            w = _get(tensors, wkey)
            k_ours = symmetric_basis(nu, cfg.max_ell, L).shape[-1]
            if w.shape[0] == 1 and n_el > 1:  # use_agnostic_product: one weight set shared by every element
                w = w.expand(n_el, -1, -1)
            basis = bases.get(ukey, "stored" if ukey in tensors else None)
            if basis is None:
                raise ValueError(f"hyper.json has no coupling basis for {ukey!r} and model.safetensors no such "
                                 "tensor; re-run the dumper")
            k_mace = k_ours if basis == "unreduced" else _get(tensors, ukey).shape[-1]
            if tuple(w.shape) != (n_el, k_mace, c):
                raise ValueError(f"model.safetensors tensor {wkey!r} has shape {tuple(w.shape)}, expected "
                                 f"({n_el}, {k_mace}, {c})")
            if basis == "unreduced":  # mace's own trees, rebuilt with the dumping e3nn's w3j signs
                u = coupling_trees(nu, cfg.max_ell, L, signs)
            else:
                u = _get(tensors, ukey)
                u = u.unsqueeze(0) if L == 0 else u  # mace drops the M axis for L = 0
            out[f"products.{layer}.weights.L{L}_nu{nu}"] = contraction_weights(u, w, nu, cfg.max_ell, L, wkey)
    return out


def _check_instructions(instructions: list | None, paths: list[tuple[int, int, int]], t: int) -> None:
    """mace's conv_tp instructions (i_in1 = l1, i_in2 = l2, i_out) must follow ``conv_paths`` order."""
    if instructions is None:
        raise ValueError(f"hyper.json: interactions[{t}] has no conv_tp_instructions; re-run the dumper")
    got = [(int(i[0]), int(i[1]), int(i[2])) for i in instructions]
    want = [(l1, l2, k) for k, (l1, l2, _) in enumerate(paths)]
    if got != want:
        from .mace_hyper import refuse
        refuse(f"interactions.{t}.conv_tp instructions {got}", f"expected the paths {want} of the backbone")


def _interaction(tensors: dict, cfg: ModelConfig, t: int, ratio: float, hyper: dict) -> dict:
    c, out = cfg.num_channels, {}
    l_in = 0 if t == 0 else cfg.max_L
    pre = f"interactions.{t}"
    _check_instructions(hyper["interactions"][t].get("conv_tp_instructions"), conv_paths(l_in, cfg.max_ell), t)
    for l, w in enumerate(_linear_blocks(_get(tensors, f"{pre}.linear_up.weight"), [(c, c)] * (l_in + 1),
                                         f"{pre}.linear_up.weight")):
        out[f"interactions.{t}.linear_up.weights.{l}"] = w
    sizes = [cfg.num_bessel, *cfg.radial_mlp]
    paths = conv_paths(l_in, cfg.max_ell)
    for k in range(len(sizes)):
        w = _get(tensors, f"{pre}.conv_tp_weights.layer{k}.weight")
        expect = (sizes[k], sizes[k + 1] if k + 1 < len(sizes) else len(paths) * c)
        if tuple(w.shape) != expect:
            raise ValueError(f"model.safetensors tensor '{pre}.conv_tp_weights.layer{k}.weight' has shape "
                             f"{tuple(w.shape)}, expected {expect}")
        if k > 0:
            w = w * ratio
        if k == len(sizes) - 1:  # columns: mace's instructions (sorted by l3, then l1, l2) -> our (l1, l3) groups
            w = w.view(sizes[k], len(paths), c)[:, [paths.index(p) for p in grouped_paths(paths)]].reshape(sizes[k], -1)
        out[f"interactions.{t}.radial.weights.{k}"] = w
    counts = [sum(1 for p in paths if p[2] == l3) for l3 in range(cfg.max_ell + 1)]
    blocks = [(c, c)] * len(paths)
    mats = _linear_blocks(_get(tensors, f"{pre}.linear.weight"), blocks, f"{pre}.linear.weight")
    start = 0
    for l3, n in enumerate(counts):  # sorted irreps_mid: all paths of l3 = 0, then l3 = 1, ...
        out[f"interactions.{t}.linear.{l3}"] = torch.cat(mats[start:start + n], dim=0)
        start += n
    if cfg.interaction_norm == "density":
        out[f"interactions.{t}.density"] = _get(tensors, f"{pre}.density_fn.layer0.weight", (cfg.num_bessel, 1))
    return out


def convert_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, hyper: dict) -> dict[str, torch.Tensor]:
    """The backbone's state_dict for ``cfg`` from mace's tensors (float64 math, cast to cfg.dtype at the end)."""
    c, n_el = cfg.num_channels, len(cfg.elements)
    act = hyper["interactions"][0].get("radial_act_constant") or SILU_NORM
    ratio = act_ratio(act)
    if "w3j_signature" not in hyper:
        raise ValueError("hyper.json has no w3j_signature; re-dump the model with this foundation's mace_dump.py")
    signs = w3j_signs(hyper["w3j_signature"])
    out = {"embedding.weight": _get(tensors, "node_embedding.linear.weight", (n_el, c)).reshape(n_el, c)}
    for t in range(cfg.num_layers):
        last = t == cfg.num_layers - 1
        l_in, l_out = (0 if t == 0 else cfg.max_L), (0 if last else cfg.max_L)
        out.update(_interaction(tensors, cfg, t, ratio, hyper))
        pre = f"interactions.{t}"
        if t == 0 and cfg.first_interaction == "plain":
            w = _get(tensors, f"{pre}.skip_tp.weight")
            for l, m in enumerate(_linear_blocks(w, [(c * n_el, c)] * (cfg.max_ell + 1), f"{pre}.skip_tp.weight")):
                out[f"element_mix.weights.{l}"] = m.reshape(c, n_el, c).permute(1, 0, 2)
        else:
            w = _get(tensors, f"{pre}.skip_tp.weight")
            for l, m in enumerate(_linear_blocks(w, [(c * n_el, c)] * (min(l_in, l_out) + 1), f"{pre}.skip_tp.weight")):
                out[f"skips.{t}.weights.{l}"] = m.reshape(c, n_el, c).permute(1, 0, 2)
        out.update(_contractions(tensors, cfg, t, l_out, n_el, hyper.get("coupling_bases", {}), signs))
        lin = _get(tensors, f"products.{t}.linear.weight")
        for l, m in enumerate(_linear_blocks(lin, [(c, c)] * (l_out + 1), f"products.{t}.linear.weight")):
            out[f"product_linears.{t}.weights.{l}"] = m
        out.update(_readout(tensors, cfg, t, last, hyper))
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _readout(tensors: dict, cfg: ModelConfig, t: int, last: bool, hyper: dict) -> dict:
    c, n_heads, hidden = cfg.num_channels, len(cfg.heads), cfg.readout_mlp
    pre = f"readouts.{t}"
    if not last:
        return {f"readouts.{t}.weight": _get(tensors, f"{pre}.linear.weight", (c, n_heads)).reshape(c, n_heads)}
    w1 = _get(tensors, f"{pre}.linear_1.weight", (c, hidden * n_heads)).reshape(c, n_heads, hidden)
    w2 = _get(tensors, f"{pre}.linear_2.weight", (hidden * n_heads, n_heads)).reshape(n_heads, hidden, n_heads)
    act = hyper["readouts"][t].get("act_constant") or SILU_NORM
    # mace: silu_c(x W1 / sqrt C) W2 / sqrt(H hidden), head h reads its own hidden block (mask) and column h
    factor = readout_factor(act, hidden, n_heads)
    w_out = torch.stack([w2[h, :, h] for h in range(n_heads)]) * factor
    return {f"readouts.{t}.weight_in": w1.permute(1, 0, 2).contiguous(), f"readouts.{t}.weight_out": w_out}
