"""``logger=tensorboard``: per-epoch scalars as TensorBoard event files in RUN/tensorboard/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from finetune_cli.errors import FinetuneError

HINT = "logger=tensorboard needs the tensorboard package: pip install 'finetune-cli[tensorboard]', or use logger=none."


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    def __init__(self, folder: Path):
        if not available():
            raise FinetuneError(HINT)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log_epoch(self, row: Dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        for split in ("train", "val"):
            self.writer.add_scalar(f"loss/{split}", row[f"{split}_loss"], epoch)
            self.writer.add_scalar(f"accuracy/{split}", row[f"{split}_acc"], epoch)
        for key, value in row.items():
            if key.startswith("lr_"):
                self.writer.add_scalar(f"lr/{key[3:]}", value, epoch)
        self.writer.add_scalar("time/epoch_seconds", row["epoch_seconds"], epoch)
        self.writer.add_scalar("params/trainable", row["trainable_params"], epoch)
        for event in filter(None, str(row.get("events", "")).split("; ")):
            self.writer.add_text("events", event, epoch)
        self.writer.flush()

    def resumed(self, rows: List[Dict[str, Any]], checkpoint: Path) -> None:
        """The event files of the run's earlier epochs stay where that run wrote them."""

    def close(self, status: str = "completed", summary: Any = None) -> None:
        self.writer.close()
