"""The README's "Start from a published model" commands, run as written in a fresh folder (import mace ->
finetune -> push -> md), with three substitutions CI needs: the import reads the dump of the Cu-Au model trained
here with mace_run_train instead of running the dumper in a mace venv (no mace-torch in CI), step counts are small,
and ORG/NAME is a repo on a Hub-protocol server on 127.0.0.1."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write

from foundation.hubserver import serve_in_thread
from foundation.train.engine import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[2]
DUMP = REPO / "tests" / "interop" / "fixtures" / "trained"
QUICK = ["--set", "max_steps=3", "--set", "valid_every=3", "--set", "progress=false"]


def readme_commands() -> list[list[str]]:
    """The ``foundation ...`` commands of the README's bash block that imports a mace model, in order."""
    text = (REPO / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "foundation import mace" in b]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        commands += [shlex.split(part) for part in line.split("&&") if part.strip().startswith("foundation ")]
    return commands


def adapted(argv: list[str], cell: Path) -> list[str]:
    verb = argv[1]
    if verb == "import":
        source = argv.index("my.model")
        argv = argv[:source] + [str(DUMP)] + argv[source + 1:]
        i = argv.index("--mace-python")
        return argv[:i] + argv[i + 2:]
    if verb == "finetune":
        return argv + QUICK
    argv = [a.replace("ORG/NAME", "org/mace-cuau").replace("cu.xyz", str(cell)) for a in argv]
    if verb == "md":
        argv[argv.index("--steps") + 1] = "4"
    return argv


@pytest.mark.slow
def test_import_finetune_push_md_as_the_readme_shows(tmp_path):
    from foundation.data.generate import generate
    commands = readme_commands()
    assert [c[1] for c in commands] == ["import", "finetune", "push", "md"]
    generate("tiny", tmp_path / "data" / "demo", seed=0)
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    cell = tmp_path / "cu.extxyz"
    write(cell, bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)))
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "test-token",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env = {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES}   # an in-process run's MASTER_PORT
    try:
        for argv in commands:
            argv = adapted(argv, cell)
            proc = subprocess.run([sys.executable, "-m", "foundation.cli", *argv[1:]], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "runs" / "finetune_imported_mace" / "model" / "config.json").is_file()
    assert (tmp_path / "cu.md.log").read_text().count("\n") >= 2
