"""Graceful stop on SIGTERM, Ctrl-C or SIGUSR2 (the warning SLURM and submitit send before a time
limit or a preemption): the run finishes its current step, keeps its last complete checkpoint,
records the interruption and exits 128 + the signal: 143 (SIGTERM), 130 (SIGINT), 140 (SIGUSR2;
a SLURM sweep job then requeues itself and resumes). A second signal exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("finetune_cli")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Exception):
    """``stage="setup"``: before the first epoch (data check, model, feature extraction)."""

    def __init__(self, signum: int, epoch: int = 0, stage: str = "epoch"):
        name = signal.Signals(signum).name
        super().__init__(f"{name} during setup, before training" if stage == "setup" else f"{name} during {stage} {epoch}")
        self.signum, self.epoch = signum, epoch

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Handling:
    """Installs ``self._handle`` for SIGNALS while in use (main thread only), and puts
    back the handlers it replaced."""

    def __init__(self) -> None:
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class GracefulStop(_Handling):
    """``on_second``: called with the signal number before the second signal ends the process
    (the run records itself as interrupted there)."""

    def __init__(self, on_second: Optional[Callable[[int], None]] = None) -> None:
        super().__init__()
        self.signum: Optional[int] = None
        self._on_second = on_second

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            if self._on_second is not None:
                try:
                    self._on_second(signum)
                finally:
                    os._exit(128 + signum)
            os._exit(128 + signum)
        self.signum = signum
        log.warning(
            f"{signal.Signals(signum).name} received: stopping after the current step "
            "(send it again to quit at once)."
        )


class StopAtOnce(_Handling):
    """Before the epochs, where there is no step to finish: SIGTERM or Ctrl-C raises
    ``Interrupted`` (stage "setup") at once, so the run still records how it ended. The epoch loop
    and the synthetic pretraining install ``GracefulStop`` inside it."""

    def _handle(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum, stage="setup")
