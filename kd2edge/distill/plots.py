"""The distill stage's pictures: the loss curves (CSV beside them for other tools)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_loss_curves(history: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """loss_history.csv and loss_curve.png (total, KD and CE loss per optimizer step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path = out_dir / "loss_history.csv", out_dir / "loss_curve.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "kd", "ce", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    for key, label in (("loss", "total"), ("kd", "KD divergence"), ("ce", "CE on gold")):
        ax.plot(steps, [r[key] for r in history], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path
