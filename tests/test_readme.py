"""The README's Python examples run exactly as written; its tables name every subcommand and every shipped recipe
with its verb; every recipe command line shown in README.md and docs/ loads; every relative link there resolves
(file and anchor)."""
import math
import re
from pathlib import Path

import pytest
import torch

from foundation import FoundationCalculator, FoundationModel, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_examples():
    blocks = _python_blocks()
    assert len(blocks) == 2 and "ModelConfig.preset" in blocks[0] and "VelocityVerlet" in blocks[1]


def test_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()


def test_md_example_runs(tmp_path, monkeypatch, capsys):
    """The MD block loads the demo's fine-tuned model directory: here a small model saved at the same path."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = ModelConfig.preset("student", elements=["Cu", "Au"], heads=["emt", "cuau"], dtype="float64")
    FoundationModel(config).save_pretrained(tmp_path / "runs" / "finetune_demo_cuau" / "model")
    namespace: dict = {}
    exec(compile(_python_blocks()[1], "README.md", "exec"), namespace)
    printed = [float(line.rsplit(":", 1)[1]) for line in capsys.readouterr().out.splitlines() if "(eV):" in line]
    assert len(printed) == 2 and all(map(math.isfinite, printed))
    atoms = namespace["atoms"]
    fresh = atoms.copy()
    fresh.calc = FoundationCalculator.from_pretrained("runs/finetune_demo_cuau/model", head="cuau", dtype="float64")
    assert printed[1] == pytest.approx(fresh.get_potential_energy() + atoms.get_kinetic_energy(), abs=1e-8)


def test_readme_names_every_subcommand():
    from foundation.cli import build_parser
    text = README.read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    verbs = [f"foundation {name}" for name in sub.choices if name != "data"]
    verbs += [f"foundation data {name}" for name in next(
        a for a in sub.choices["data"]._actions if a.dest == "data_command").choices]
    missing = [name for name in verbs if f"`{name}" not in text]
    assert not missing, f"README.md's command table does not name {missing}"


COMMAND = re.compile(r"foundation(?:\.cli)? (pretrain|finetune|distill|learn) (recipes/[^\s`]+\.yaml)"
                     r"((?: --set [^\s`]+)*)")


def _loaders() -> dict:
    from foundation.distill import load_distill_config
    from foundation.finetune import load_finetune_config
    from foundation.learn.config import load_learn_config
    from foundation.train import load_config
    return {"pretrain": load_config, "finetune": load_finetune_config, "distill": load_distill_config,
            "learn": load_learn_config}


def test_every_recipe_command_shown_loads():
    """Each `foundation VERB recipes/X.yaml --set K=V ...` in README.md and docs/ names a recipe that loads with
    those overrides (validated, not run)."""
    loaders = _loaders()
    shown = {m for page in PAGES for m in COMMAND.findall(page.read_text())}
    assert len(shown) >= 8 and {verb for verb, _, _ in shown} == set(loaders)
    for verb, recipe, sets in sorted(shown):
        loaders[verb](ROOT / recipe, sets.split(" --set ")[1:])


def test_recipe_table_verbs_and_one_layout():
    """The README's recipe table gives each recipe's verb, and `--set max_steps=50` sets every one of them."""
    rows = re.findall(r"^\| `(recipes/\S+\.yaml)` \| `(\w+)` \|", README.read_text(), flags=re.M)
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert sorted(r for r, _ in rows) == shipped
    for recipe, verb in rows:
        assert _loaders()[verb](ROOT / recipe, ["max_steps=50"]).max_steps == 50, recipe

def slug(heading: str) -> str:
    """The anchor of a markdown heading as GitHub and Python-Markdown's toc make it (code marks and punctuation
    dropped, spaces to hyphens, lower case)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", text)


def anchors(page: Path) -> set[str]:
    """Anchors of ``page``'s headings (outside code blocks), plus those of README sections it includes."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    if '--8<-- "README.md:guide"' in text:
        found |= anchors(README)
    return found


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file does not exist, or whose ``#anchor`` names no heading there."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links {broken_links(page)}"


def test_link_check_finds_broken_links(tmp_path):
    """The check is not vacuous: README links into docs/, and missing files and anchors are reported."""
    assert any(t.startswith("docs/benchmarks.md#") for t in relative_links(README))
    (tmp_path / "a.md").write_text("# Model speed vs `mace-torch`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](a.md#model-speed-vs-mace-torch) [gone](b.md) [bad](a.md#speed) ![fig](c.png) "
                    "[web](https://example.org/x.md) `[code](d.md)`\n```\n[block](e.md)\n```\n")
    assert [b.split()[0] for b in broken_links(page)] == ["b.md", "a.md#speed", "c.png"]
