"""curves.png: a one-point series shows, the EMA's evaluation is drawn beside the live weights',
and the epoch axis uses metrics.jsonl's own epoch numbers."""
import numpy as np

from engine.metrics import curves_figure, plot_curves

# What a one-epoch run with an EMA writes to metrics.jsonl (engine.metrics.TrainLog).
ONE_EPOCH = [
    {"kind": "train", "epoch": 0, "step": 4, "loss": 1.28, "skipped": 0, "lr": 0.05,
     "img_s": 10.0, "data_wait": 0.1},
    {"kind": "eval", "epoch": 0, "step": 4, "top1": 33.3, "top5": 100.0, "loss": 2.18,
     "images": 6},
    {"kind": "eval_ema", "epoch": 0, "step": 4, "top1": 16.7, "top5": 83.3, "loss": 2.5,
     "images": 6},
]


def pixels_of(fig, ax, rgb):
    """How many pixels of colour `rgb` the axes `ax` shows once drawn."""
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    x0, y0, x1, y1 = (int(v) for v in ax.get_window_extent().extents)
    h = img.shape[0]
    box = img[h - y1:h - y0, x0:x1]
    return int((np.abs(box - np.array(rgb)).sum(-1) < 40).sum())


def test_a_one_point_series_is_drawn():
    fig = curves_figure(ONE_EPOCH)
    ax_loss, ax_lr, _ = fig.axes
    (loss,) = ax_loss.lines
    assert len(loss.get_xdata()) == 1 and loss.get_marker() not in (None, "None", "")
    assert pixels_of(fig, ax_loss, (0x1F, 0x77, 0xB4)) > 4  # tab:blue, the loss
    assert pixels_of(fig, ax_lr, (0xFF, 0x7F, 0x0E)) > 4    # tab:orange, the LR


def test_the_ema_eval_is_drawn_and_epochs_are_metrics_jsonl_s():
    records = ONE_EPOCH + [
        {"kind": "train", "epoch": 1, "step": 8, "loss": 1.0, "lr": 0.01},
        {"kind": "eval", "epoch": 1, "step": 8, "top1": 50.0, "top5": 100.0},
        {"kind": "eval_ema", "epoch": 1, "step": 8, "top1": 40.0, "top5": 90.0}]
    fig = curves_figure(records)
    ax_acc = fig.axes[2]
    labels = [line.get_label() for line in ax_acc.lines]
    assert labels == ["top-1", "top-5", "top-1 (EMA)", "top-5 (EMA)"]
    for line in ax_acc.lines:
        assert list(line.get_xdata()) == [0, 1]  # the epochs metrics.jsonl records
    assert list(ax_acc.lines[2].get_ydata()) == [16.7, 40.0]
    assert "metrics.jsonl" in ax_acc.get_xlabel()


def test_plot_curves_writes_a_png(tmp_path):
    path = plot_curves(ONE_EPOCH, str(tmp_path / "curves.png"), title="resnet18 on D")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
