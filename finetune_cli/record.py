"""The Recorder: the one owner of every file a run writes in its folder.

summary.json, metrics.csv, classes.json, skipped_images.txt, the preview picture, checkpoints
(last.pt every epoch, best.pt, epoch_NNN.pt, stage_best.pt), the feature cache, the logger's
(TensorBoard, MLflow), and the record of an interruption or failure. Every write is atomic: a crash
leaves the previous file, never a partial one. In multi-process training only rank 0 has one.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune_cli import ui
from finetune_cli.config import LoggerConfig
from finetune_cli.errors import Refused
from finetune_cli.io_utils import (
    atomic_csv,
    atomic_json,
    atomic_link,
    atomic_torch_save,
    atomic_write_bytes,
    text_bytes,
)
from finetune_cli.tracking import EpochLogger, open_logger
from finetune_cli.train.features import FeatureStore
from finetune_cli.train.shutdown import Interrupted

log = logging.getLogger("finetune_cli")

# What a second signal leaves the logger to record the end (an MLflow run KILLED, TensorBoard's
# last events) before the process quits: a store that does not answer by then is left as it is.
FORCED_CLOSE_SECONDS = 5.0


class Recorder:
    """``writes=False``: the recorder of a process other than rank 0, which keeps the same record
    in memory (the run's decisions read it) and writes nothing."""

    def __init__(self, out_dir: Path, command: str = "finetune-cli", writes: bool = True):
        self.out_dir = Path(out_dir)
        self.command = command
        self.writes = writes
        self.started = time.perf_counter()
        self.summary: Dict[str, Any] = {}
        self.rows: List[Dict[str, Any]] = []
        self.saved_epoch = 0  # the newest epoch saved: in last.pt once this run saved one, else in resumed_from
        self.saved_here = False
        self.resumed_from: Optional[Path] = None
        self.logger: Optional[EpochLogger] = None

    def _write(self, write: Any, *args: Any) -> None:
        if self.writes:
            write(*args)

    def write(self, write: Any, *args: Any) -> None:
        """``write(*args)`` where this process writes the run's files (rank 0)."""
        self._write(write, *args)

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def features_before(self) -> Path:
        """The head's input features of both domains' val images before training (a target domain)."""
        return self.out_dir / "adapt_features_before.pt"

    @property
    def stage_best(self) -> Path:
        return self.checkpoints / "stage_best.pt"

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    # -- before training ----------------------------------------------------------------------

    def skipped_images(self, bad: Dict[str, str]) -> Path:
        path = self.out_dir / "skipped_images.txt"
        self._write(atomic_write_bytes, path, text_bytes("".join(f"{p}\t{why}\n" for p, why in sorted(bad.items()))))
        return path

    def feature_store(self) -> FeatureStore:
        return FeatureStore(self.out_dir / "features")

    def preview(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        self.summary = {**summary, "output_dir": str(self.out_dir)}
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        return self.summary

    def lr_found(self, summary: Dict[str, Any], rows: List[Dict[str, Any]], picture: Any) -> Dict[str, Any]:
        """task=lr_find: lr_find.csv (each step), lr_find.json (the suggestion), lr_find.png
        (``picture(path)`` draws it) and summary.json; no checkpoint, no metrics.csv."""
        self.summary = {**summary, "status": "completed", "total_seconds": self.seconds()}
        self._write(atomic_csv, rows, self.out_dir / "lr_find.csv")
        self._write(atomic_json, summary["lr_find"], self.out_dir / "lr_find.json")
        self._write(picture, self.out_dir / "lr_find.png")
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        return self.summary

    def planned(self, summary: Dict[str, Any], classes: List[str]) -> Dict[str, Any]:
        self.summary = {**summary, "status": "planned", "events": []}
        self._write(atomic_json, classes, self.out_dir / "classes.json")
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        return self.summary

    def begin(self, summary: Dict[str, Any], classes: List[str], *, logger: Optional[LoggerConfig] = None,
              config: Optional[Dict[str, Any]] = None) -> None:
        """Training starts: the run's first summary, its classes, the logger asked for (``config``:
        the resolved config, for MLflow's params)."""
        self.summary = {**summary, "status": "running", "events": []}
        self._write(atomic_json, classes, self.out_dir / "classes.json")
        if logger is not None and self.writes:
            self.logger = open_logger(logger, self.out_dir, config or {})

    def resumed(self, checkpoint: Path, saved_epoch: int, history: List[Dict[str, Any]], events: List[Dict[str, Any]]) -> None:
        """Continue the files of the run that saved ``checkpoint``; its stage snapshot and the
        domains' features before training come along."""
        self.saved_epoch, self.resumed_from = saved_epoch, checkpoint
        self.rows = list(history)
        self._write(atomic_csv, self.rows, self.out_dir / "metrics.csv")
        self.summary.update({"events": list(events), "resumed_from": str(checkpoint)})
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        for source, here in ((checkpoint.parent / self.stage_best.name, self.stage_best),
                             (run_dir / self.features_before.name, self.features_before)):
            if source.is_file() and source.resolve() != here.resolve():
                self._write(atomic_link, source, here)
        if self.logger is not None:
            self.logger.resumed(self.rows, checkpoint)

    # -- every epoch --------------------------------------------------------------------------

    def epoch(self, row: Dict[str, Any], checkpoint: Dict[str, Any], *, best: bool, keep_as: Optional[str] = None,
              stage_best: bool = False, summary: Dict[str, Any]) -> None:
        """An epoch's metrics row, checkpoints and summary, in that order."""
        self.rows.append(row)
        self._write(atomic_csv, self.rows, self.out_dir / "metrics.csv")
        self._write(atomic_torch_save, checkpoint, self.last)
        self.saved_epoch, self.saved_here = int(row["epoch"]), True
        for name, wanted in (("best.pt", best), (keep_as, bool(keep_as)), (self.stage_best.name, stage_best)):
            if wanted:  # the same bytes: linked to last.pt, neither serialized nor stored again
                self._write(atomic_link, self.last, self.checkpoints / name)
        self.summary.update(summary, total_seconds=self.seconds())
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        if self.logger is not None:  # saved first: what a logger holds is always in the folder
            self.logger.log_epoch(row)

    # -- the end ------------------------------------------------------------------------------

    def close(self, status: str) -> None:
        """The logger's end, with the summary as it stands (its ``status`` aside)."""
        if self.logger is not None:
            logger, self.logger = self.logger, None
            logger.close(status, {**self.summary, "status": status})

    def completed(self, **extra: Any) -> Dict[str, Any]:
        self.summary.update(extra, status="completed", total_seconds=self.seconds())
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        self.close("completed")
        if self.writes:
            ui.show_result(self.summary)
        return self.summary

    def forced_out(self, signum: int) -> None:
        """A second signal ends the process at once: summary.json says so rather than "running",
        and the logger gets FORCED_CLOSE_SECONDS to record the end."""
        self.summary.update(status="interrupted", error=f"{signal.Signals(signum).name} twice: quit at once, "
                            "the epoch under way abandoned", total_seconds=self.seconds())
        self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        if self.logger is not None:
            closing = threading.Thread(target=self.close, args=("interrupted",), name="logger-close", daemon=True)
            closing.start()
            closing.join(FORCED_CLOSE_SECONDS)
            if closing.is_alive():
                log.warning(f"The logger did not record the end within {FORCED_CLOSE_SECONDS:g} s; quitting without "
                            "it (a tracking server may still show this run as running).")

    def failed(self, error: BaseException) -> None:
        """The run stops on an error: the logger is told (summary.json records it: ``mark_failed``)."""
        if self.logger is not None:
            self.summary.update(error=failure_text(error), total_seconds=self.seconds())
            self.close("failed")

    def interrupted(self, exc: Interrupted) -> SystemExit:
        """Record the interruption, say how to resume; the caller raises what this returns
        (exit 130 for SIGINT, 143 for SIGTERM)."""
        try:
            return self._interrupted(exc)
        finally:
            self.close("interrupted")

    def _interrupted(self, exc: Interrupted) -> SystemExit:
        if not self.writes:  # rank 0 records it and says how to resume
            return SystemExit(exc.exit_code)
        if self.summary:
            self.summary.update(status="interrupted", error=str(exc), total_seconds=self.seconds())
            self._write(atomic_json, self.summary, self.out_dir / "summary.json")
        else:  # before training began: what an earlier run of this folder recorded stays, a completed one whole
            earlier = read_summary(self.out_dir)
            if earlier.get("status") != "completed":
                self._write(atomic_json, {**earlier, "status": "interrupted", "error": str(exc)}, self.out_dir / "summary.json")
            if self.last.is_file():
                log.warning(f"Interrupted ({exc}); the run's files are as they were. Resume with:\n"
                            f"  {self.command} trainer.resume={self.last}")
                return SystemExit(exc.exit_code)
        saved = self.last if self.saved_here else self.resumed_from
        if saved is not None and self.saved_epoch:
            log.warning(
                f"Interrupted ({exc}); that epoch is abandoned. Epochs 1-{self.saved_epoch} are saved in {saved}. "
                f"Resume with:\n  {self.command} trainer.resume={saved}"
            )
        else:
            log.warning(f"Interrupted ({exc}) before the first epoch ended: nothing to resume, nothing cached. "
                        f"Run again: {self.command}")
        return SystemExit(exc.exit_code)


def read_summary(run_dir: Path) -> Dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def failure_text(error: BaseException) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}"


def mark_failed(out_dir: Path, error: BaseException) -> None:
    """Record a failure in summary.json, keeping whatever the run already wrote; a refused run
    (``Refused``: it did nothing, in a folder holding an earlier run) records nothing."""
    if isinstance(error, Refused):
        return
    summary = read_summary(out_dir)
    summary.update({"status": "failed", "error": failure_text(error)})
    try:
        atomic_json(summary, out_dir / "summary.json")
    except OSError as exc:  # a full disk or a read-only folder: the error itself is still shown
        log.warning(f"Could not record the failure in {out_dir / 'summary.json'} ({exc.strerror}).")
