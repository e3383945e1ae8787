"""logger=mlflow against a real local store (SQLite in the test's folder), read back with MLflow's
own client: params, per-epoch metrics, artifacts, status, resume, sweeps, and a store that fails."""

import csv
import json
import signal
import socket

import pytest

from finetune_cli.errors import FinetuneError
from finetune_cli.train import fit as fit_module
from finetune_cli.train.shutdown import Interrupted

from helpers import cli, run_dirs

pytest.importorskip("mlflow")

TINY = ("debug=tiny", "logger=mlflow")


@pytest.fixture(autouse=True)
def _no_outside_mlflow(monkeypatch):
    """No tracking server or experiment from the environment, and no retries against a dead server."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module's runs (a new one makes its tables: about 2 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def the_run(run_dir):
    """The MLflow run a run folder reports to (RUN/mlflow.json), and a client of its store."""
    record = json.loads((run_dir / "mlflow.json").read_text())
    c = client(record["tracking_uri"])
    return c, c.get_run(record["run_id"])


def csv_rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def history(c, run, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_a_run_is_an_mlflow_run_in_the_outputs_store(finetune, tmp_path):
    summary, run_dir = finetune(*TINY, "trainer.epochs=2", "strategy=freeze_early", "optimizer.lr=0.003",
                                "logger.log_checkpoint=true", "+logger.tags.team=vision")
    assert summary["status"] == "completed"
    c, run = the_run(run_dir)
    assert c.tracking_uri == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"  # the default store
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert c.get_experiment(run.info.experiment_id).name == "finetune-cli"
    params = run.data.params
    assert params["strategy.name"] == "freeze_early" and params["optimizer.lr"] == "0.003"
    assert params["optimizer.betas"] == "[0.9, 0.999]" and params["trainer.resume"] == "null"
    assert run.data.tags["run_dir"] == str(run_dir) and run.data.tags["team"] == "vision"

    rows = csv_rows(run_dir)
    assert history(c, run, "val_acc") == [(int(r["epoch"]), float(r["val_acc"])) for r in rows]
    groups = [k for k in rows[0] if k.startswith("lr_")]
    assert {"lr_stem", "lr_head"} <= set(groups)
    for key in groups + ["train_loss", "epoch_seconds", "trainable_params"]:
        assert history(c, run, key) == [(int(r["epoch"]), float(r[key])) for r in rows], key
    assert run.data.metrics["summary.best.value"] == summary["best"]["value"]
    assert run.data.metrics["summary.epochs_run"] == 2

    files = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "classes.json", "checkpoints"} <= files
    assert [a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    stored = tmp_path / "outputs" / "mlartifacts" / run.info.run_id / "artifacts"
    assert json.loads((stored / "summary.json").read_text())["best"] == summary["best"]
    assert (stored / "metrics.csv").read_bytes() == (run_dir / "metrics.csv").read_bytes()


@pytest.mark.fault
def test_an_interrupted_run_is_killed_and_resuming_goes_on_in_the_same_mlflow_run(finetune, store, tmp_path,
                                                                                   monkeypatch):
    args = (*TINY, "trainer.epochs=3", f"logger.tracking_uri={store}", "logger.experiment=resume")
    real = fit_module.train_and_validate

    def stopped_in_epoch_3(parts, inputs, epoch, stop, totals):
        if epoch == 3:
            raise Interrupted(signal.SIGTERM, epoch)  # what a SIGTERM during the epoch raises
        return real(parts, inputs, epoch, stop, totals)

    monkeypatch.setattr(fit_module, "train_and_validate", stopped_in_epoch_3)
    with pytest.raises(SystemExit):
        finetune(*args)
    (run_dir,) = run_dirs_of(tmp_path)
    c, run = the_run(run_dir)
    assert run.info.status == "KILLED" and [s for s, _ in history(c, run, "val_acc")] == [1, 2]
    assert "summary.json" in {a.path for a in c.list_artifacts(run.info.run_id)}
    monkeypatch.setattr(fit_module, "train_and_validate", real)

    # resumed into a new folder: a new MLflow run with the whole history
    summary, fork = finetune(*args, f"trainer.resume={run_dir}", name="fork")
    _, forked = the_run(fork)
    assert forked.info.run_id != run.info.run_id and forked.data.tags["resumed_from"].endswith("last.pt")
    assert forked.data.tags["resumed_from_run"] == run.info.run_id
    assert history(c, forked, "val_acc") == [(int(r["epoch"]), float(r["val_acc"])) for r in csv_rows(fork)]

    # resumed in its own folder: the same MLflow run goes on
    summary, same = finetune(*args, "trainer.resume=auto", out_dir=run_dir)
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    _, again = the_run(run_dir)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert history(c, again, "val_acc") == [(int(r["epoch"]), float(r["val_acc"])) for r in csv_rows(run_dir)]
    assert len(csv_rows(run_dir)) == 3
    assert again.data.tags["resumed_with"] == "trainer.resume=auto"
    assert len(c.search_runs([run.info.experiment_id])) == 2


def run_dirs_of(tmp_path):
    return sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())


@pytest.mark.fault
def test_a_failed_run_is_failed_in_mlflow(finetune, store, tmp_path, monkeypatch):
    real = fit_module.train_and_validate

    def breaks_in_epoch_2(parts, inputs, epoch, stop, totals):
        if epoch == 2:
            raise FinetuneError("The validation val_acc became nan at epoch 2.")
        return real(parts, inputs, epoch, stop, totals)

    monkeypatch.setattr(fit_module, "train_and_validate", breaks_in_epoch_2)
    with pytest.raises(FinetuneError):
        finetune(*TINY, "trainer.epochs=2", f"logger.tracking_uri={store}")
    (run_dir,) = run_dirs_of(tmp_path)
    c, run = the_run(run_dir)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("FinetuneError: The validation")
    assert [s for s, _ in history(c, run, "val_acc")] == [1]


@pytest.mark.fault
def test_a_store_that_fails_mid_run_never_stops_training(finetune, store, caplog, monkeypatch):
    """Epoch 2's metrics fail to go (a server down): one warning, training goes on, and the end of
    the run, finding the store back, sends what it missed."""
    from mlflow.tracking import MlflowClient

    real, failed = MlflowClient.log_batch, []

    def down_once(self, run_id, metrics=(), params=(), tags=(), **kw):
        if not failed and any(m.step == 2 for m in metrics):
            failed.append(True)
            raise ConnectionError("Connection refused")
        return real(self, run_id, metrics, params, tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", down_once)
    summary, run_dir = finetune(*TINY, "trainer.epochs=3", f"logger.tracking_uri={store}")
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    assert caplog.text.count("Training goes on") == 1 and "answers again" in caplog.text
    c, run = the_run(run_dir)
    assert run.info.status == "FINISHED"
    assert history(c, run, "val_acc") == [(int(r["epoch"]), float(r["val_acc"])) for r in csv_rows(run_dir)]


@pytest.mark.fault
def test_a_server_that_never_answers_costs_a_warning(finetune, caplog):
    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    summary, run_dir = finetune(*TINY, "trainer.epochs=2", f"logger.tracking_uri=http://127.0.0.1:{port}")
    assert summary["status"] == "completed" and len(csv_rows(run_dir)) == 2
    assert caplog.text.count("Training goes on") == 1 and "still failing at the end" in caplog.text
    assert not (run_dir / "mlflow.json").exists()


def test_each_sweep_job_is_a_run_tagged_with_its_sweep(tmp_path, store):
    proc = cli(["-m", "debug=tiny", "logger=mlflow", f"logger.tracking_uri={store}", "logger.experiment=sweep",
                "strategy=linear_probe,full"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    c = client(store)
    runs = c.search_runs([c.get_experiment_by_name("sweep").experiment_id], order_by=["tags.job"])
    jobs = run_dirs(sweep)
    assert [r.data.tags["sweep"] for r in runs] == [str(sweep)] * 2
    assert [r.data.tags["job"] for r in runs] == ["0", "1"]
    assert [r.info.run_name for r in runs] == [j.name for j in jobs]
    assert [r.data.params["strategy.name"] for r in runs] == ["linear_probe", "full"]
    assert [r.data.tags["overrides"].split()[-1] for r in runs] == ["strategy=linear_probe", "strategy=full"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {"summary.json", "metrics.csv", "finetune.log", "hydra"} <= {a.path for a in c.list_artifacts(runs[0].info.run_id)}
    hydra = {a.path for a in c.list_artifacts(runs[0].info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= hydra


@pytest.mark.bad_input
def test_without_mlflow_installed_the_run_is_refused_before_training(finetune, tmp_path, monkeypatch):
    import importlib.util

    import finetune_cli.mlflowlog as mlflowlog

    real = importlib.util.find_spec
    monkeypatch.setattr(mlflowlog.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(FinetuneError) as err:
        finetune(*TINY)
    assert "pip install 'finetune-cli[mlflow]'" in str(err.value) and "logger=none" in str(err.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.bad_input
def test_mlflow_settings_without_logger_mlflow_are_refused(finetune, tmp_path):
    with pytest.raises(FinetuneError, match="logger.tracking_uri, logger.experiment are set, but logger=tensorboard"):
        finetune("debug=tiny", "logger=tensorboard", "logger.tracking_uri=http://x:5000", "logger.experiment=e")
    assert not (tmp_path / "runs").exists()


def test_params_past_mlflows_limits_are_cut_and_batched(store, tmp_path):
    """250 params (MLflow takes 100 a call) and a 7,000-character value (it keeps 6,000)."""
    from finetune_cli.mlflowlog import MLflowLogger

    config = {"group": {f"key{i:03d}": i for i in range(249)}, "long": "x" * 7000}
    logger = MLflowLogger(tmp_path, config, tracking_uri=store, experiment="limits")
    logger.log_epoch({"epoch": 1, "val_loss": 0.5, "events": "unfroze layer4"})
    logger.close("completed", {"best": {"value": 0.5}})
    assert logger.broken is None
    c, run = the_run(tmp_path)
    params = run.data.params
    assert len(params) == 250 and params["group.key248"] == "248"
    assert len(params["long"]) == 6000 and params["long"].endswith("...")
    assert run.data.metrics == {"val_loss": 0.5, "summary.best.value": 0.5}
