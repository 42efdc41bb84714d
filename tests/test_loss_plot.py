"""loss.png: the y axis names the loss that was optimised (also kept as PNG text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from slimseg.compress.loss_plot import draw_loss_curve


def test_the_y_label_is_drawn_and_stored(tmp_path: Path) -> None:
    steps, losses, epochs = [1, 2, 3, 4], [1.0, 0.7, 0.5, 0.45], [(1, 2), (2, 4)]
    draw_loss_curve(tmp_path / "mse.png", steps, losses, epochs, title="Training loss: run")
    draw_loss_curve(tmp_path / "focal.png", steps, losses, epochs, title="Training loss: run",
                    y_label="loss (20 x focal + dice + IoU MSE)")
    mse, focal = Image.open(tmp_path / "mse.png"), Image.open(tmp_path / "focal.png")
    assert mse.text == {"Title": "Training loss: run", "YLabel": "loss (MSE)"}
    assert focal.text["YLabel"] == "loss (20 x focal + dice + IoU MSE)"
    # same data and title: the pixels differ only where the label is drawn, above the plot
    changed = np.argwhere((np.asarray(mse.convert("RGB")) != np.asarray(focal.convert("RGB"))).any(axis=-1))
    assert len(changed) > 0
    assert changed[:, 0].max() < 50 and changed[:, 1].min() >= 90  # rows above the frame, from its left edge
