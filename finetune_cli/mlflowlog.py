"""``logger=mlflow``: each run folder is one MLflow run.

It holds the resolved config as params (dotted keys), every epoch's numeric metrics.csv columns
as metrics with step = epoch, the summary's figures as ``summary.*`` metrics, and as artifacts
summary.json, metrics.csv, classes.json, the run's pictures and log, the Hydra config and, with
``log_checkpoint``, checkpoints/best.pt. Its status ends FINISHED, KILLED (a signal) or FAILED.

The run's id is kept in RUN/mlflow.json: resuming the folder goes on in the same MLflow run, and
a run resumed into a new folder gets a new MLflow run holding the whole history. A store that
fails (a server down) never stops training: one warning, nothing more is sent, and at the end one
more try sends what is missing. mlflow is imported only here, and only for logger=mlflow.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import OmegaConf

from finetune_cli.io_utils import atomic_json, waiting_lock
from finetune_cli.train.checkpoint import _flat as flat

log = logging.getLogger("finetune_cli")

HINT = ("logger=mlflow needs the mlflow package: pip install 'finetune-cli[mlflow]' (mlflow-skinny, with "
        "SQLAlchemy for the local store), or use logger=none.")
DEFAULT_EXPERIMENT = "finetune-cli"
LOCAL_STORE = Path("outputs") / "mlflow.db"  # under the working directory, where Hydra puts runs
RECORD = "mlflow.json"  # in the run folder: which store and run it reports to
STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
# MLflow's limits (mlflow.utils.validation): a param's value, a tag's, a key
MAX_PARAM, MAX_TAG, MAX_KEY = 6000, 8000, 250
# A server that does not answer: MLflow's own default retries for about 4 minutes per call
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# the run folder's files sent at the end (artifact folder, glob)
ARTIFACTS = (("", "metrics.csv"), ("", "classes.json"), ("", "skipped_images.txt"), ("", "*.png"), ("", "*.log"),
             ("hydra", ".hydra/*.yaml"))


def _sql_store(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


def store_uri(configured: Optional[str], earlier: Optional[str] = None) -> str:
    """logger.tracking_uri, else $MLFLOW_TRACKING_URI, else the store the run folder's earlier
    run used, else the local SQLite store outputs/mlflow.db. A SQLite file is named by its
    absolute path: a resume from another directory finds the same store."""
    found = configured or os.environ.get("MLFLOW_TRACKING_URI") or earlier or f"sqlite:///{LOCAL_STORE}"
    if found.startswith("sqlite:///") and not found.startswith("sqlite:////"):
        found = "sqlite:///" + str((Path.cwd() / found[len("sqlite:///"):]).absolute())
    return found


def missing_package(tracking_uri: Optional[str]) -> Optional[str]:
    """HINT when mlflow (or, for a database store, SQLAlchemy and Alembic) cannot be imported."""
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if _sql_store(store_uri(tracking_uri)) else [])
    return HINT if any(importlib.util.find_spec(name) is None for name in needed) else None


def params_of(config: Dict[str, Any]) -> Dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as Hydra writes them (null,
    true, [1, 2]); a value past MLflow's limit is cut, ending in '...'."""
    found = {}
    for key, value in flat(config).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        found[key[:MAX_KEY]] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."
    return found


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / space and colon)."""
    return re.sub(r"[^\w./\- :]", "_", name)[:MAX_KEY]


def numbers(values: Dict[str, Any]) -> Dict[str, float]:
    """The numeric entries (not flags) of ``values``, by metric name."""
    return {metric_key(k): float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def job_tags(out_dir: Path) -> Dict[str, str]:
    """What the run folder's Hydra record (.hydra/hydra.yaml) says of the job: its overrides and,
    for a sweep's job, the sweep's folder and the job's number."""
    path = out_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    try:
        hydra = OmegaConf.load(path).hydra
        tags = {"overrides": " ".join(hydra.overrides.task) or "(none)"}
        if str(hydra.mode) == "MULTIRUN":
            tags.update(sweep=str(out_dir.parent), job=str(hydra.job.num))
        return tags
    except Exception as exc:  # another Hydra's record: the run is tagged without it
        log.debug(f"No job tags from {path}: {exc}")
        return {}


class MLflowLogger:
    def __init__(self, out_dir: Path, config: Dict[str, Any], *, tracking_uri: Optional[str] = None,
                 experiment: Optional[str] = None, run_name: Optional[str] = None,
                 tags: Optional[Dict[str, str]] = None, log_checkpoint: bool = False):
        self.out_dir = Path(out_dir).absolute()
        earlier = self._record()
        self.uri = store_uri(tracking_uri, earlier.get("tracking_uri"))
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.earlier_run = earlier.get("run_id") if earlier.get("tracking_uri") == self.uri else None
        jobs = job_tags(self.out_dir)
        self.name = run_name or self.out_dir.name
        self.tags = {"run_dir": str(self.out_dir), **jobs, **(tags or {})}
        self.params = params_of(config)
        self.log_checkpoint = log_checkpoint
        self.rows: List[Dict[str, Any]] = []  # every epoch of the run, sent or not
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.broken: Optional[str] = None  # why nothing is sent now (tried once more at the end)
        self.warned = False
        self._attempt(self._start)

    # -- the Recorder's calls -------------------------------------------------------------------

    def log_epoch(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.broken:
            self._attempt(lambda: self._send_rows([row]))

    def resumed(self, rows: List[Dict[str, Any]], checkpoint: Path) -> None:
        self.rows = list(rows)
        if not self.broken:
            self._attempt(lambda: self._catch_up(resumed_from=Path(checkpoint)))

    def close(self, status: str, summary: Dict[str, Any]) -> None:
        if self.broken:  # one more try: the store may be back
            was, self.broken = self.broken, None
            self._attempt(self._start if self.run_id is None else self._catch_up)
            if self.broken:
                log.warning(f"MLflow: still failing at the end ({self.broken}); this run is not complete there. "
                            f"Its files in {self.out_dir} are.")
                return
            log.info(f"MLflow: the store answers again (it failed with: {was}); the run's epochs are sent.")
        self._attempt(lambda: self._finish(status, summary))
        self.client = None

    # -- MLflow ---------------------------------------------------------------------------------

    def _attempt(self, step: Callable[[], None]) -> None:
        """``step``; an error from the store stops the sending (one warning) and training goes on."""
        try:
            step()
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            self.broken = f"{type(exc).__name__}: {first}"
            if not self.warned:
                self.warned = True
                log.warning(f"MLflow ({self.uri}) failed: {self.broken}. Training goes on; the run's files in "
                            f"{self.out_dir} hold everything, and the end of the run tries once more.")

    def _record(self, run_dir: Optional[Path] = None) -> Dict[str, Any]:
        try:
            found = json.loads(((run_dir or self.out_dir) / RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _start(self) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        for name in ("mlflow.store.db.utils", "alembic"):  # their table set-up lines
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():  # SQLAlchemy 2.1 on MLflow's table mappings: not ours to fix
            warnings.filterwarnings("ignore", message=".*noload.*")
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):  # sweep jobs at once: one makes the tables, the others wait
                db = Path(self.uri[len("sqlite:///"):])
                db.parent.mkdir(parents=True, exist_ok=True)
                with waiting_lock(db.with_name(db.name + ".lock"), f"MLflow: waiting for {db}"):
                    self.client = MlflowClient(tracking_uri=self.uri)
                    experiment_id = self._experiment(db.parent / "mlartifacts")
            else:
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment_id = self._experiment(None)
        run = self._earlier_run()
        if run is None:
            run = self.client.create_run(experiment_id, run_name=self.name, tags={
                "mlflow.user": getpass.getuser(), "mlflow.source.name": "finetune-cli"})
        self.run_id = run.info.run_id
        atomic_json({"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id},
                    self.out_dir / RECORD)
        self._send_params(run.data.params)
        browse = f" (browse: mlflow ui --backend-store-uri {self.uri})" if self.uri.startswith("sqlite:") else ""
        log.info(f"MLflow: run {self.run_id} ({self.name}) in experiment '{self.experiment}' at {self.uri}{browse}")
        if self.rows:
            self._catch_up()

    def _experiment(self, artifacts: Optional[Path]) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifacts.as_uri() if artifacts else None)
        except MlflowException:  # another job made it meanwhile
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _earlier_run(self) -> Any:
        """The MLflow run this folder reported to before, running again; None to start one."""
        if not self.earlier_run:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.earlier_run)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning(f"MLflow: run {self.earlier_run} of {self.out_dir / RECORD} is not in {self.uri} "
                        "(deleted?): a new run starts.")
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _send_params(self, before: Dict[str, str]) -> None:
        """The config's params the run lacks; a value changed by a resume (the settings it may
        change: trainer.resume, the device, data.root...) goes in the tag ``resumed_with``."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in self.params.items() if k not in before]
        changed = "; ".join(f"{k}={v}" for k, v in self.params.items() if k in before and before[k] != v)
        tags = {**self.tags, **({"resumed_with": changed} if changed else {})}
        self.client.log_batch(self.run_id, params=new, tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])

    def _metrics(self, rows: List[Dict[str, Any]]) -> List[Any]:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(key, value, now, int(row["epoch"])) for row in rows
                for key, value in numbers({k: v for k, v in row.items() if k != "epoch"}).items()]

    def _send_rows(self, rows: List[Dict[str, Any]]) -> None:
        if rows:
            self.client.log_batch(self.run_id, metrics=self._metrics(rows))

    def _catch_up(self, resumed_from: Optional[Path] = None) -> None:
        """Send the epochs the MLflow run lacks (a resume into a new folder: all of them)."""
        if resumed_from is not None:
            self.client.set_tag(self.run_id, "resumed_from", str(resumed_from))
            source = resumed_from.parent.parent if resumed_from.parent.name == "checkpoints" else resumed_from.parent
            earlier = self._record(source)
            if earlier.get("tracking_uri") == self.uri and earlier.get("run_id") not in (None, self.run_id):
                self.client.set_tag(self.run_id, "resumed_from_run", earlier["run_id"])
        sent = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        self._send_rows([r for r in self.rows if int(r["epoch"]) not in sent])

    def _finish(self, status: str, summary: Dict[str, Any]) -> None:
        from mlflow.entities import Metric

        summary = {**summary, "status": status}
        epoch = int(self.rows[-1]["epoch"]) if self.rows else 0
        now = int(time.time() * 1000)
        figures = {k: v for k, v in numbers(flat(summary)).items() if math.isfinite(v)}
        self.client.log_batch(self.run_id, metrics=[Metric(f"summary.{k}", v, now, epoch) for k, v in figures.items()])
        if summary.get("error"):
            self.client.set_tag(self.run_id, "error", str(summary["error"])[:MAX_TAG])
        self.client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
        for folder, pattern in ARTIFACTS:
            for path in sorted(self.out_dir.glob(pattern)):
                self.client.log_artifact(self.run_id, str(path), folder or None)
        best = self.out_dir / "checkpoints" / "best.pt"
        if self.log_checkpoint and status == "completed" and best.is_file():
            self.client.log_artifact(self.run_id, str(best), "checkpoints")
        self.client.set_terminated(self.run_id, STATUS.get(status, "FINISHED"))
