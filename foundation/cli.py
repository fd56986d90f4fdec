"""The ``foundation`` command line: argument parsing only; every subcommand calls library code.

Each subcommand is registered by one ``_add_*`` function that builds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import sys


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="convert, inspect and generate datasets (LMDB shards)")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser(
        "convert", help="convert ASE-readable files / .aselmdb into LMDB shards + manifest.json",
        description="Stream INPUT files into LMDB shards + manifest.json (atomic; re-running is a no-op). "
                    "Required labels: those named by --*-key plus every label the first valid record has; a "
                    "later record missing one is invalid. Stress is only required of (and stored for) structures "
                    "periodic in all three directions. Invalid records (NaN/inf, missing label, unknown element, "
                    "atoms closer than 0.1 Å) stop the conversion naming file and record, unless --skip-invalid.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="extxyz, ASE db, OUTCAR, .aselmdb ... (anything ASE reads)")
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

    p = dsub.add_parser("list", help="the small public datasets shipped in a source checkout's data/ folder "
                                     "(name, split, structures, level of theory, license)")
    p.set_defaults(func=_run_list)

    p = dsub.add_parser("generate",
                        help="make a labelled multi-element corpus with EMT (metals) and GFN2-xTB (molecules)")
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


def _run_list(args: argparse.Namespace) -> int:
    from .data.catalog import listing
    print(listing())
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from .data.generate import generate
    for part, path in generate(args.preset, args.out, seed=args.seed).items():
        print(f"{part}: {path}")
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a saved model directory (config.json, model.safetensors, README.md) "
                                    "to the Hugging Face Hub (HF_ENDPOINT / HF_TOKEN honoured)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by save_pretrained")
    p.add_argument("repo_id", metavar="REPO_ID", help="namespace/name; created if it does not exist")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import push_folder
    sha = push_folder(args.model_dir, args.repo_id, revision=args.revision, private=args.private,
                      commit_message=args.message, token=args.token)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed {args.model_dir} to {args.repo_id}{at}: commit {sha}")
    return 0


def _add_md(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("md", help="molecular dynamics with a model (ASE); writes a trajectory and a log")
    p.add_argument("model", metavar="MODEL", help="Hub repo id or saved model directory")
    p.add_argument("structure", metavar="STRUCTURE", help="any file ASE reads (last frame is used)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True, help="K (initial velocities; thermostat target)")
    p.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nve")
    p.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    p.add_argument("--pressure", type=float, default=0.0, help="GPa, for npt (default 0)")
    p.add_argument("--friction", type=float, default=0.01, help="1/fs, Langevin friction for nvt (default 0.01)")
    p.add_argument("--trajectory", default=None, help="output .traj (default STRUCTURE_STEM.md.traj)")
    p.add_argument("--log", default=None, help="output log (default STRUCTURE_STEM.md.log)")
    p.add_argument("--interval", type=int, default=10, help="steps between frames/log lines (default 10)")
    p.add_argument("--head", default=None, help="readout head (default: the model's first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--seed", type=int, default=0, help="seed of initial velocities and the Langevin noise")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the energy (faster small-system MD after a 30-60 s first-step compile)")
    p.set_defaults(func=_run_md)


def _run_md(args: argparse.Namespace) -> int:
    from .md import md
    summary = md(args.model, args.structure, args.steps, args.temperature, args.ensemble, args.timestep,
                 trajectory=args.trajectory, log=args.log, interval=args.interval, head=args.head, device=args.device,
                 dtype=args.dtype, revision=args.revision, seed=args.seed, pressure_gpa=args.pressure,
                 friction_per_fs=args.friction, compile=args.compile)
    print(summary)
    return 0


def _add_recipe_arguments(p: argparse.ArgumentParser, example: str, set_example: str) -> None:
    """The RECIPE.yaml positional, the repeatable ``--set KEY=VALUE`` and ``--resume``/``--overwrite`` shared by
    pretrain/finetune/distill/learn."""
    p.add_argument("recipe", metavar="RECIPE.yaml", help=f"e.g. {example}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe value, e.g. {set_example} (repeatable)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in out_dir")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the checkpoints and model of an earlier run in out_dir, then start afresh "
                            "(an out_dir holding checkpoints is refused without --resume or --overwrite)")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a model from a recipe with DeepSpeed (1 process, or N under "
                                        "torchrun/deepspeed); checkpoints, logs and the exported model go to out_dir")
    _add_recipe_arguments(p, "recipes/pretrain_small.yaml", "--set optim.lr=3e-4 --set data.train=[DIR]")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import main as pretrain
    report = pretrain(args.recipe, args.set, resume=args.resume, overwrite=args.overwrite)
    if report:
        print(report)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="MAE/RMSE of a model on a dataset, per property, dataset and head")
    p.add_argument("model", metavar="MODEL", help="saved model directory or Hub repo id")
    p.add_argument("data", metavar="DATA", nargs="+", help="dataset directory (LMDB shards) or ASE-readable file")
    p.add_argument("--plot", default=None, metavar="PNG", help="write parity plots to this file")
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--max-atoms", type=int, default=512, help="atoms per inference batch (default 512)")
    p.add_argument("--head", default=None, help="readout head to evaluate (default: the model's first)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import main as evaluate
    print(evaluate(args.model, args.data, plot=args.plot, json_path=args.json, max_atoms=args.max_atoms,
                   device=args.device, head=args.head))
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (directory or Hub id at a pinned revision) on "
                                        "new data: full, frozen backbone, LoRA or multi-head replay")
    _add_recipe_arguments(p, "recipes/finetune_mlearn_si.yaml", "--set max_steps=200 --set replay.weight=0.3")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune.run import main as finetune
    print(finetune(args.recipe, args.set, resume=args.resume, overwrite=args.overwrite))
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher (our model, or any ASE calculator such as SevenNet-0) into a "
                                       "fast student: teacher labels with Hessian-vector products (cached), training, "
                                       "on-policy rounds, speed/error/NVE report in the student's card")
    _add_recipe_arguments(p, "recipes/distill_sevenn_si.yaml",
                          "--set max_steps=200 --set seeds.max_structures=8")
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from .distill.run import main as distill
    print(distill(args.recipe, args.set, resume=args.resume, overwrite=args.overwrite))
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import another code's model exactly (mace-torch) as an ordinary saved model")
    isub = p.add_subparsers(dest="format", required=True)
    m = isub.add_parser("mace", help="a mace-torch .model file (dumped by --mace-python's mace-torch, never unpickled "
                                     "here) or a dump directory -> config.json + model.safetensors + card")
    m.add_argument("source", help="mace .model file (needs --mace-python) or a dump directory (hyper.json + "
                                  "model.safetensors from foundation/interop/mace_dump.py)")
    m.add_argument("--out", required=True, help="new output directory")
    m.add_argument("--mace-python", default=None, help="python of a mace-torch environment "
                                                       "(bash scripts/setup_mace_venv.sh DIR -> DIR/bin/python)")
    m.add_argument("--license", default=None, help="license of the weights (required unless the file's sha256 is a "
                                                   "published file foundation knows); recorded in the card")
    m.set_defaults(func=_run_import_mace)


def _run_import_mace(args: argparse.Namespace) -> int:
    from .interop.mace import main as import_mace
    return import_mace(args)


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a model in a format that runs without foundation")
    esub = export.add_subparsers(dest="export_command", required=True)
    p = esub.add_parser("torchscript", help="one TorchScript file for one head (loads with plain torch: "
                                            "torch.jit.load; used by LAMMPS' ML-IAP class)")
    p.add_argument("model", metavar="MODEL", help="Hub repo id or saved model directory")
    p.add_argument("--out", required=True, help="output file, e.g. model.pt")
    p.add_argument("--head", default=None, help="readout head, fixed in the file (default: the model's first)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default: the model's dtype")
    p.set_defaults(func=_run_export)
    m = esub.add_parser("mace", help="a saved model (imported mace model or its fine-tune) -> mace-torch .model, "
                                     "built by --mace-python's mace-torch")
    m.add_argument("model", help="saved model directory")
    m.add_argument("--out", required=True, help="new .model file")
    m.add_argument("--mace-python", required=True, help="python of a mace-torch environment")
    m.set_defaults(func=_run_export_mace)


def _run_export(args: argparse.Namespace) -> int:
    from .integrations.artifact import main
    print(main(args.model, args.out, head=args.head, dtype=args.dtype))
    return 0


def _run_export_mace(args: argparse.Namespace) -> int:
    from .interop.mace_export import main as export_mace
    return export_mace(args)


def _add_learn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="active learning (DP-GEN style): committee MD from your structures, label the "
                                     "frames where the committee disagrees with any ASE calculator, fine-tune, repeat")
    _add_recipe_arguments(p, "recipes/learn_cuau_emt.yaml", "--set stop.max_iterations=2 --set committee.size=4")
    p.set_defaults(func=_run_learn)


def _run_learn(args: argparse.Namespace) -> int:
    from .learn.run import main as learn
    print(learn(args.recipe, args.set, resume=args.resume, overwrite=args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundation", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"foundation {__version__}")
    # `deepspeed --module foundation.cli ...` inserts --local_rank=N; the rank is read from LOCAL_RANK instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_data, _add_push, _add_md, _add_pretrain, _add_evaluate, _add_finetune, _add_distill, _add_learn,
             _add_import, _add_export]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TimeoutError) as exc:  # user errors: one line, no traceback
        print(f"foundation {args.command}: error: {exc}", file=sys.stderr)
        return 2
    # anything else (KeyError, TypeError, ...) is a bug of ours: it propagates with its traceback


if __name__ == "__main__":
    sys.exit(main())
