"""The documentation site's API reference (docs/api/*.md, mkdocstrings ``::: name`` directives) covers every public
name, and every page under docs/ is in mkdocs.yml's navigation. The build itself is ``scripts/build_docs.sh``."""
import importlib
import re
import types
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the packages (by __all__) and modules (every public member) the API reference documents
PACKAGES = ["foundation", "foundation.data", "foundation.model", "foundation.train", "foundation.finetune",
            "foundation.distill"]
MODULES = ["foundation.evaluate", "foundation.recipe", "foundation.calculator", "foundation.hub", "foundation.md"]


def resolve(dotted: str):
    """The object a mkdocstrings identifier names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def directives() -> dict[str, bool]:
    """``{identifier: members shown}`` for every ``::: identifier`` in docs/api/*.md."""
    found = {}
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for ident, options in re.findall(r"^::: (\S+)\n((?:    .*\n)*)", page.read_text(), flags=re.M):
            found[ident] = "members: false" not in options
    return found


def public_members(module) -> list[str]:
    """Functions and classes defined in ``module`` whose names do not start with an underscore."""
    return [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
            and getattr(v, "__module__", None) == module.__name__]


def test_every_public_name_is_documented():
    found = directives()
    objects = [resolve(i) for i in found]
    shown_modules = [resolve(i) for i, members in found.items() if members and isinstance(resolve(i), types.ModuleType)]
    missing = []
    for package in PACKAGES:
        mod = importlib.import_module(package)
        for name in (n for n in mod.__all__ if n != "__version__"):
            obj = getattr(mod, name)
            if not any(obj is o for o in objects) and not any(getattr(m, name, None) is obj for m in shown_modules):
                missing.append(f"{package}.{name}")
    for module in MODULES:
        if module not in found or not found[module]:
            missing.append(f"{module} (module with its members)")
    assert not missing, f"docs/api/*.md documents no ::: directive for {missing}"


def test_every_module_listed_has_public_members():
    """The module pages are not empty: each module documented whole defines public functions or classes."""
    for module in MODULES:
        assert public_members(importlib.import_module(module)), module


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def test_every_page_is_in_the_navigation():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.SafeLoader)
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav_pages(config["nav"])) == pages
