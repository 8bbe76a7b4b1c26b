"""``fedscalectl report JOB --out DIR``: a job's metrics for people who would rather look.

Writes ``metrics.csv`` (one row per round: participants, training loss, test accuracy and loss, duration)
and, when matplotlib is installed (the optional extra ``fedscaled[report]``), ``report.png``: test accuracy
and training loss by round. Runs in fedscalectl only; the daemon never imports matplotlib.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = ("round", "model_version", "participants", "planned", "train_loss", "test_accuracy", "test_top5",
           "test_loss", "test_samples", "test_devices", "duration")


def write_csv(job: dict[str, Any], path: Path) -> int:
    """Every round's metrics as CSV (the initial model's test as round 0); returns the row count."""
    rows: list[dict[str, Any]] = []
    if job.get("initial_test"):
        rows.append({"round": 0, "model_version": 0, **job["initial_test"]})
    rows += job["metrics"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return len(rows)


def write_png(job: dict[str, Any], path: Path) -> bool:
    """Test accuracy and training loss by round; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = job["metrics"]
    tested = [(0, job["initial_test"]["test_accuracy"])] if job.get("initial_test") else []
    tested += [(m["round"], m["test_accuracy"]) for m in metrics if m.get("test_accuracy") is not None]
    trained = [(m["round"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot([r for r, _ in tested], [100 * a for _, a in tested], marker="o")
    top.set_ylabel("test accuracy (%)")
    top.set_ylim(0, 100)
    top.grid(alpha=0.3)
    bottom.plot([r for r, _ in trained], [loss for _, loss in trained], color="tab:red")
    bottom.set_ylabel("training loss")
    bottom.set_xlabel("round")
    bottom.grid(alpha=0.3)
    figure.suptitle(f"{job['name']}: {job['model']}, {job['state']} at round {job['round']}/{job['rounds']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
