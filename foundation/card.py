"""The model card (README.md of a saved model): rendered from ``config.json`` and the card template.

``render_card(cfg, source)`` fills ``model_card_template.md`` (also ``model_cards/TEMPLATE.md``) with the
architecture, training data, metrics (meV units, "not evaluated" when absent), the physics beyond the cutoff and
a load example for ``source`` (a Hub repo id or a local directory) that runs a head on elements it trained on.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"   # also model_cards/TEMPLATE.md (symlink)
_REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id ``namespace/name`` (it may also be a local path)."""
    return bool(_REPO_ID.fullmatch(str(name)))

def _yaml_front_matter(cfg: dict) -> str:
    import yaml
    mc, datasets, metrics = cfg["model_config"], cfg.get("datasets") or [], cfg.get("metrics") or {}
    meta: dict[str, Any] = {
        "library_name": "foundation", "license": cfg.get("license", "mit"),
        "tags": ["foundation", "interatomic-potential", "machine-learning-potential", "mace", "equivariant",
                 "atomistic-simulation", "chemistry", "materials-science"],
    }
    if datasets:
        meta["datasets"] = [d.get("hub_id", d["name"]) for d in datasets]
    if metrics:
        meta["model-index"] = [{"name": cfg.get("name", "foundation-model"), "results": [
            {"task": {"type": "interatomic-potential", "name": "Energies, forces and stresses"},
             "dataset": {"name": ds, "type": ds},
             "metrics": [{"type": k, "name": k, "value": float(v)} for k, v in values.items()]}
            for ds, values in metrics.items()]}]
    meta["elements"] = list(mc.get("elements", []))
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _example_structure(elements: list[str]) -> tuple[str, str]:
    """(import line, code building an ase.Atoms) made only of ``elements``: a metal crystal, else a molecule of
    >= 3 atoms (ASE's g2 set), else a diamond / simple-cubic crystal, else any g2 molecule, else a chain in a box."""
    from ase.build import molecule
    from ase.collections import g2
    from ase.data import atomic_numbers, reference_states
    sym = {el: (reference_states[atomic_numbers[el]] or {}).get("symmetry") for el in elements}
    bulk_code = lambda el: ("from ase.build import bulk", f'atoms = bulk("{el}", cubic=True).repeat((2, 2, 2))')  # noqa: E731
    metals = [el for el in elements if sym[el] in ("fcc", "bcc")]
    if metals:
        return bulk_code(metals[0])
    sizes = {n: len(molecule(n)) for n in g2.names if set(molecule(n).get_chemical_symbols()) <= set(elements)}
    best = max((n for n in sizes if sizes[n] >= 3), key=lambda n: (sizes[n], n), default=None)
    if best:
        return "from ase.build import molecule", f'atoms = molecule("{best}")\natoms.center(vacuum=5.0)'
    covalent = [el for el in elements if sym[el] in ("diamond", "sc")]
    if covalent:
        return bulk_code(covalent[0])
    if sizes:
        return "from ase.build import molecule", f'atoms = molecule("{max(sizes, key=lambda n: (sizes[n], n))}")\n' \
            "atoms.center(vacuum=5.0)"
    symbols = "".join(elements[:4])
    return ("from ase import Atoms",
            f'atoms = Atoms("{symbols}", positions=[[2.2 * i, 0.0, 0.0] for i in range({len(elements[:4])})])\n'
            "atoms.center(vacuum=5.0)")


def example_head(cfg: dict) -> tuple[str | None, list[str]]:
    """(head, elements) for the card's example: the first head whose training data is recorded with its elements
    (so that the example runs that head on elements it was trained on), else (None, every model element)."""
    mc = cfg["model_config"]
    heads = list(mc.get("heads") or [])
    for head in heads:
        rows = [d for d in cfg.get("datasets") or [] if d.get("head", heads[0]) == head and d.get("elements")]
        seen = {el for d in rows for el in d["elements"]} & set(mc.get("elements", []))
        if seen:
            return (head if len(heads) > 1 else None), [el for el in mc["elements"] if el in seen]
    return None, list(mc.get("elements", []))


def usage_code(cfg: dict, source: str) -> str:
    """The card's load-and-run-MD example for a model published at ``source`` (repo id or directory)."""
    head, elements = example_head(cfg)
    imp, build = _example_structure(elements)
    head_arg = f', head="{head}"' if head else ""
    return f'''from ase import units
{imp}
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from foundation import FoundationCalculator

calc = FoundationCalculator.from_pretrained("{source}"{head_arg}, device="cpu", dtype="float64")
{build}
atoms.calc = calc
print("potential energy (eV):", atoms.get_potential_energy())
MaxwellBoltzmannDistribution(atoms, temperature_K=300)
dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
dyn.run(20)
print("total energy after 20 fs (eV):", atoms.get_total_energy())'''


def _long_range_text(long_range: dict | None, max_total_charge) -> str:
    """The card's sentences on physics beyond the cutoff and on the total charge (``atoms.info["charge"]``)."""
    if max_total_charge:
        charge = (f" The total charge (`atoms.info[\"charge\"]`, -{max_total_charge} to +{max_total_charge} e)"
                  " is an input.")
    elif long_range:
        charge = " The total charge (`atoms.info[\"charge\"]`) fixes the sum of the latent charges."
    else:
        charge = " The total charge is not an input: an ion and its neutral parent at one geometry get one energy."
    if not long_range:
        return ("This model has no long-range charge head: beyond the receptive field atoms do not interact "
                "(no electrostatics or dispersion tails)." + charge)
    kind = "erf-damped Coulomb, molecules only" if long_range.get("kind") == "coulomb" else \
        "Coulomb for molecules, latent Ewald / PME for periodic cells"
    return (f"A long-range charge head adds the electrostatics of latent charges at every distance ({kind}, "
            f"smearing {long_range.get('sigma', 1.0):g} Å) and the calculator reports the charges and the dipole; "
            "dispersion tails are absent." + charge)


def render_card(cfg: dict, source: str, template: str | Path | None = None) -> str:
    """README.md text: the packaged card template filled from a config.json dict; ``source`` = repo id or dir."""
    template = Path(template or TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; it ships inside the foundation "
                                "package (reinstall foundation, or pass template=PATH)")
    mc, fw = cfg["model_config"], cfg["framework"]
    elements, heads = list(mc.get("elements", [])), list(mc.get("heads") or ["default"])
    r_max, layers = float(mc.get("r_max", float("nan"))), int(mc.get("num_layers", 1))
    arch = [["elements", ", ".join(elements)], ["cutoff r_max", f"{r_max:g} Å"],
            ["parameters", f"{cfg['model_info']['parameters']:,}"], ["heads", ", ".join(heads)]]
    arch += [[k, v] for k, v in mc.items()
             if k not in ("elements", "r_max", "heads") and not isinstance(v, (dict, list))]
    datasets = cfg.get("datasets") or []
    with_head = any(d.get("head") for d in datasets)
    data = (_table(["dataset"] + ["head"] * with_head + ["structures", "level of theory", "license"],
                   [[d["name"]] + [d.get("head") or "-"] * with_head
                    + [f"{int(d['structures']):,}" if d.get("structures") is not None else "unknown",
                       d.get("level_of_theory") or "not recorded", d.get("license") or "not recorded"]
                    for d in datasets])
            if datasets else "Not recorded: this checkpoint was saved without training-data metadata.")
    metrics = cfg.get("metrics") or {}
    metric_rows = [[ds, k, f"{float(v):.4g}"] for ds, vals in metrics.items() for k, v in vals.items()]
    values = {
        "front_matter": _yaml_front_matter(cfg),
        "title": cfg.get("name") or (source if _REPO_ID.fullmatch(source) else "foundation interatomic potential"),
        "summary": cfg.get("description") or (
            f"A MACE-style equivariant machine-learning interatomic potential for {', '.join(elements)}, trained and "
            "published with `foundation`. It predicts energies (eV), forces (eV/Å) and stresses (eV/Å³)."),
        "model_table": _table(["property", "value"], arch), "heads": ", ".join(f"`{h}`" for h in heads),
        "training_data": data,
        "metrics": (_table(["dataset", "metric", "value"], metric_rows) + "\n\nMeasured by `foundation evaluate`."
                    if metric_rows else "Not evaluated: no metrics were recorded when this checkpoint was saved."),
        "extra_outputs": ", charges and dipoles" if mc.get("charges") or mc.get("long_range") else "",
        "long_range": _long_range_text(mc.get("long_range"), mc.get("max_total_charge")),
        "elements": ", ".join(elements), "r_max": f"{r_max:g}", "num_layers": str(layers),
        "receptive_field": f"{r_max * layers:g}", "usage_code": usage_code(cfg, source),
        "citation": cfg.get("citation") or (
            "@software{foundation,\n  title = {foundation: pretrain, fine-tune, distill and publish equivariant "
            "machine-learning interatomic potentials},\n  version = {" + fw["version"] + "},\n}\n\n"
            "@inproceedings{batatia2022mace,\n  title = {{MACE}: Higher Order Equivariant Message Passing Neural "
            "Networks for Fast and Accurate Force Fields},\n  author = {Batatia, Ilyes and "
            "Kov{\\'a}cs, D{\\'a}vid P{\\'e}ter "
            "and Simm, Gregor N. C. and Ortner, Christoph and Cs{\\'a}nyi, G{\\'a}bor},\n  booktitle = {Advances in "
            "Neural Information Processing Systems},\n  year = {2022}\n}"),
        "framework_version": fw["version"], "format_version": str(fw["format_version"]),
    }
    text = template.read_text()
    unknown = set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values)
    if unknown:
        raise ValueError(f"{template} uses unknown placeholders {sorted(unknown)}; known: {sorted(values)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)
