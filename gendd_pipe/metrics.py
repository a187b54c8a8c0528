"""Metrics: top-k accuracy counts, and the per-epoch log of a training run.

`EpochLog` appends one record per epoch to ``metrics.jsonl`` (nested, the source
of truth), to ``metrics.csv`` (flat columns such as ``val/student/top1``, for
spreadsheets and ``dvc plots``) and, when tensorboard is installed (the
``tensorboard`` extra), to TensorBoard event files under ``tensorboard/``.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import torch

from gendd_pipe.layout import EPOCHS, EPOCHS_CSV

log = logging.getLogger(__name__)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, int]:
    """Number of rows whose label is among the top-k logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hit = top == labels[:, None]
    return {f"top{k}": int(hit[:, :k].any(1).sum()) for k in ks}


def as_percent(hits: dict[str, int], n: int) -> dict[str, float]:
    return {k: 100.0 * v / n for k, v in hits.items()}


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """``{"val": {"student": {"top1": 9}}}`` -> ``{"val/student/top1": 9}``; numbers only."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def read_epochs(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, EPOCHS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class EpochLog:
    """Appends epoch records to ``metrics.jsonl``, ``metrics.csv`` and (when installed) TensorBoard."""

    def __init__(self, run_dir: str, keep_through: int = 0):
        """Open the log of ``run_dir``, keeping the records of epochs ``<= keep_through`` (a resumed run)."""
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.records = [r for r in read_epochs(run_dir) if r["epoch"] <= keep_through]
        self._rewrite()
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            log.debug("tensorboard is not installed: no event files")
        else:
            self._tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=keep_through + 1)

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(os.path.join(self.run_dir, EPOCHS), "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self._tensorboard:
            for name, value in flatten(record).items():
                if name != "epoch":
                    self._tensorboard.add_scalar(name, value, record["epoch"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()

    def _rewrite(self) -> None:
        with open(os.path.join(self.run_dir, EPOCHS), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._write_csv()

    def _write_csv(self) -> None:
        rows = [flatten(r) for r in self.records]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(os.path.join(self.run_dir, EPOCHS_CSV), "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
