"""What a run writes as it goes: CSV logs, TensorBoard, a progress bar and the learning-curve figure."""
from __future__ import annotations

from pathlib import Path

from .csvlog import CsvLog
from .plots import learning_curve


class RunLogger:
    """CSV (``train.csv``, ``valid.csv``), TensorBoard (``tb/``) and a progress bar, on rank 0 only.

    Floats are written with ``repr`` (exact round trip). On resume (``start_step`` > 0) rows after
    ``start_step`` are dropped first, so a resumed run's logs read as one uninterrupted run.
    A learning-curve PNG (``learning_curve.png``) is drawn on ``close()``.
    """

    def __init__(self, out_dir, active: bool, start_step: int, total: int, progress: bool = True):
        self.out, self.active = Path(out_dir), active
        self.files: dict = {}
        self.bar = self.tb = None
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("train", "valid"):
            self.files[name] = CsvLog(self.out / f"{name}.csv", start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep training if a user removed it
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def train(self, step: int, row: dict, log: bool = True) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", atoms_s=f"{row['atoms_per_s']:.0f}", refresh=False)
        if log:
            self.files["train"].write({"step": step, **row})
            if self.tb is not None:
                for k, v in row.items():
                    self.tb.add_scalar(f"train/{k}", v, step)

    def valid(self, step: int, row: dict) -> None:
        if not self.active:
            return
        self.files["valid"].write({"step": step, **row})
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.write(f"step {step}: valid loss {row['valid/loss']:.6g}")

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        learning_curve(self.out / "train.csv", self.out / "valid.csv", self.out / "learning_curve.png")
