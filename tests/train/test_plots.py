"""foundation.train.plots: figures are written (parent folders created) and closed."""
from __future__ import annotations

import numpy as np

from foundation.train.plots import _pyplot, parity, save_figure


def test_save_figure_creates_folders_and_closes_the_figure(tmp_path):
    plt = _pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "a" / "b" / "fig.png", dpi=50)
    assert out.stat().st_size > 1000 and not plt.fignum_exists(fig.number)


def test_parity_writes_one_panel_per_property(tmp_path):
    ref = np.linspace(0.0, 1.0, 20)
    out = parity({"energy": (ref, ref + 0.01), "forces": (ref, ref)}, tmp_path / "sub" / "parity.png")
    assert out.stat().st_size > 5000
