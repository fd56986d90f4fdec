"""The ``foundation`` command line: argument parsing only; every subcommand calls library code.

Each subcommand is registered by one ``_add_*`` function that builds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import sys


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="convert, inspect and generate datasets (LMDB shards)")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("convert", help="convert ASE-readable files / .aselmdb into LMDB shards + manifest.json")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="extxyz, ASE db, OUTCAR, .aselmdb ... (anything ASE reads)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--shard-size", type=int, default=10000, help="structures per LMDB shard (default 10000)")
    p.add_argument("--dataset-name", default=None, help="name recorded in the manifest (default: output dir name)")
    p.add_argument("--energy-key", default=None, help="name of the energy label in the input (default: auto)")
    p.add_argument("--forces-key", default=None)
    p.add_argument("--stress-key", default=None)
    p.add_argument("--charges-key", default=None)
    p.add_argument("--r-max", type=float, default=5.0, help="cutoff (Å) for the mean-neighbor-count statistic")
    p.add_argument("--level-of-theory", default=None, help="e.g. 'PBE/def2-SVP', recorded in the manifest")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records and write skipped.json instead of stopping at the first")
    p.set_defaults(func=_run_convert)

    p = dsub.add_parser("inspect", help="print the manifest and statistics of a converted dataset")
    p.add_argument("path", metavar="DIR")
    p.add_argument("--verify", action="store_true", help="recompute checksums and decode every record")
    p.set_defaults(func=_run_inspect)

    p = dsub.add_parser("generate", help="make a labelled multi-element corpus with EMT (metals) and GFN2-xTB (molecules)")
    p.add_argument("--preset", default="demo", help="corpus size preset: demo (default) or tiny")
    p.add_argument("--out", required=True, help="output directory; one converted dataset per part inside")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_generate)


def _run_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert
    key_map = {k: v for k, v in (("energy", args.energy_key), ("forces", args.forces_key),
                                 ("stress", args.stress_key), ("charges", args.charges_key)) if v}
    convert(args.inputs, args.out, shard_size=args.shard_size, dataset_name=args.dataset_name, key_map=key_map,
            skip_invalid=args.skip_invalid, r_max=args.r_max, level_of_theory=args.level_of_theory)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect
    print(inspect(args.path, verify=args.verify))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from .data.generate import generate
    for part, path in generate(args.preset, args.out, seed=args.seed).items():
        print(f"{part}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundation", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"foundation {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_data]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: one clear line, no traceback
        print(f"foundation {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
