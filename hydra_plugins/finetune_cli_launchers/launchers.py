"""The launchers, over hydra-submitit-launcher and submitit: submitit starts each job in a
process of its own (locally, or as a SLURM job), hands its result back, and on the warning
signal before a time limit checkpoints and requeues it. What is added here:

- one run folder per job whatever the number of processes: only rank 0 writes ``.hydra/``;
- a job that was stopped by the warning resumes from its own last checkpoint when requeued
  (``trainer.resume=auto`` in the same folder), also when SLURM itself requeued it;
- a failed job never stops the others: every job's result is collected, and the sweep fails
  (non-zero exit, closing table still printed) after the last one;
- ``parallel``: jobs run at once, each on its own GPUs (as many as its ``trainer.devices``) and an
  equal share of the cores, so that they neither share a card nor oversubscribe the CPU.

Everything heavy is imported inside the methods: Hydra imports this module at every start."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)
POLL_S = 0.5


class _Jobs(BaseSubmititLauncher):
    resume_job = False  # set on a job stopped by the warning signal: its requeued copy resumes

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> JobReturn:
        import submitit

        from finetune_cli.launching import STOP_SIGNAL, enter_share

        enter_share()
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # see _quiet_sigint
            signal.signal(signal.SIGINT, signal.default_int_handler)
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        env = submitit.JobEnvironment()
        requeued = self.resume_job or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        with open_dict(config):
            config.hydra.job.id = env.job_id
            config.hydra.job.num = job_num
            if env.global_rank != 0:  # one folder, one record: rank 0's
                config.hydra.output_subdir = None
            if requeued and not config.trainer.get("resume"):
                config.trainer.resume = "auto"
        try:
            return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                           job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
        except SystemExit as exc:
            if exc.code == 128 + STOP_SIGNAL:  # the run saved its state on the warning: now requeue it
                self.resume_job = True
                signal.raise_signal(STOP_SIGNAL)  # submitit's handler: checkpoint() below, requeue, exit
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        self.resume_job = True
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    # -- in the sweep's own process --

    def _sweep_dir(self) -> Path:
        """The sweep folder, resolved once here: job processes must not resolve ``${now:}`` again."""
        assert self.config is not None
        folder = Path(str(self.config.hydra.sweep.dir))
        with open_dict(self.config):
            self.config.hydra.sweep.dir = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _job_args(self, idx: int, overrides: Sequence[str]) -> tuple:
        return (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())

    @staticmethod
    def _result(job: Any, idx: int, overrides: Sequence[str]) -> JobReturn:
        """The job's JobReturn; for a job that ended without one (killed, interrupted), a failed one
        that says where its output is."""
        from finetune_cli.errors import FinetuneError

        try:
            if not _has_results(job):  # (asking would wait on the job's accounting, which may be off)
                raise RuntimeError("the job ended and wrote no result")
            return job.results()[0]
        except Exception as exc:  # submitit's UncompletedJobError / FailedJobError
            last = str(exc).strip().splitlines()[-1:] or ["no result"]
            problem = FinetuneError(f"Job #{idx} ({' '.join(overrides) or 'no overrides'}) ended without a result "
                                    f"({last[0][:300]}). Its output: {job.paths.stdout} and {job.paths.stderr}.")
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=problem)

    @staticmethod
    def _report(ret: JobReturn, idx: int, seconds: float) -> None:
        if ret.status == JobStatus.COMPLETED:
            value = ret._return_value
            said = f": best {value:.4f}" if isinstance(value, (int, float)) else ""
            log.info(f"#{idx} finished in {seconds:.0f} s{said}")
        else:
            log.error(f"#{idx} failed after {seconds:.0f} s: {ret._return_value}")


class ParallelLauncher(_Jobs):
    """``hydra/launcher=parallel``: the sweep's jobs run at once on this machine."""

    _EXECUTOR = "local"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from finetune_cli import launching

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = self._sweep_dir()
        gpus = launching.visible_gpus(self.params.get("gpus"))
        needs = [self._gpus_of(o, len(gpus)) for o in job_overrides]
        at_once = self._at_once(needs, len(gpus), len(launching.usable_cpus()))
        box = launching.Box(gpus, launching.usable_cpus(), at_once)
        log.info(f"Sweep of {len(needs)} jobs in {sweep_dir}: up to {at_once} at once on "
                 f"{len(gpus) or 'no'} GPU(s) and {len(launching.usable_cpus())} cores.")
        pending = list(range(len(needs)))
        running: Dict[int, tuple] = {}
        results: Dict[int, JobReturn] = {}
        with _Stop(running) as stop:
            while (pending and not stop.signum) or running:
                while pending and not stop.signum:
                    share = box.take(needs[pending[0]])
                    if share is None:
                        break
                    i = pending.pop(0)
                    job = self._start(submitit, i + initial_job_idx, job_overrides[i], share)
                    running[i] = (job, share, time.monotonic())
                time.sleep(POLL_S)
                for i, (job, share, started) in list(running.items()):
                    if job.done():
                        del running[i]
                        box.give_back(share)
                        results[i] = self._result(job, i + initial_job_idx, job_overrides[i])
                        self._report(results[i], i + initial_job_idx, time.monotonic() - started)
        if stop.signum:
            not_started = len(needs) - len(results)
            log.error(f"The sweep was interrupted: {len(results)} job(s) ended, {not_started} not started.")
            raise SystemExit(128 + stop.signum)
        return [results[i] for i in range(len(needs))]

    def _start(self, submitit: Any, idx: int, overrides: Sequence[str], share: Any) -> Any:
        from finetune_cli import launching

        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        executor.update_parameters(timeout_min=self.params["timeout_min"], gpus_per_node=0, tasks_per_node=1,
                                   stderr_to_stdout=bool(self.params.get("stderr_to_stdout")))
        with _environment(launching.share_env(share)), _quiet_sigint():
            job = executor.submit(self, *self._job_args(idx, overrides))
        log.info(f"#{idx} {' '.join(overrides) or '(no overrides)'}: started on {share.describe()}; "
                 f"its console: {job.paths.stdout}")
        return job

    def _gpus_of(self, overrides: Sequence[str], gpus: int) -> int:
        from finetune_cli.launching import gpus_wanted

        if gpus == 0:
            return 0
        assert self.hydra_context is not None and self.config is not None
        job = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return gpus_wanted(str(job.trainer.devices), str(job.trainer.device), gpus)

    def _at_once(self, needs: Sequence[int], gpus: int, cores: int) -> int:
        """hydra.launcher.jobs, else as many as the GPUs hold (the smallest job's share each), or on
        CPU one per core; never more than the sweep's jobs."""
        chosen = self.params.get("jobs")
        if chosen:
            return max(1, min(int(chosen), len(needs)))
        asking = [n for n in needs if n > 0]
        fit = gpus // min(asking) if asking else cores
        return max(1, min(fit, len(needs)))


class SlurmLauncher(_Jobs):
    """``hydra/launcher=slurm``: one SLURM job per sweep job (an array), collected to the last."""

    _EXECUTOR = "slurm"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        sweep_dir = self._sweep_dir()
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(_base_conf()).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        args = [self._job_args(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        jobs = executor.map_array(self, *zip(*args))
        log.info(f"Submitted {len(jobs)} SLURM job(s) ({', '.join(j.job_id for j in jobs)}); their folders are in "
                 f"{sweep_dir}. Waiting for them (Ctrl-C stops waiting; the jobs go on).")
        results: List[Optional[JobReturn]] = [None] * len(jobs)
        started = time.monotonic()
        try:
            while any(r is None for r in results):
                time.sleep(2 * POLL_S)
                active = _queued({j.job_id.split("_")[0] for j in jobs})
                for i, job in enumerate(jobs):
                    gone = active is not None and job.job_id not in active
                    if results[i] is None and (_has_results(job) or gone):
                        results[i] = self._result(job, initial_job_idx + i, job_overrides[i])
                        self._report(results[i], initial_job_idx + i, time.monotonic() - started)
        except KeyboardInterrupt:
            log.error(f"Stopped waiting; the jobs go on in SLURM: squeue -j {','.join(j.job_id for j in jobs)}. "
                      f"`finetune-cli-report {sweep_dir}` tables them when they are done.")
            raise SystemExit(130) from None
        return [r for r in results if r is not None]


def _has_results(job: Any) -> bool:
    """Every task of the job wrote its result (the job may still be ending)."""
    return all(task.paths.result_pickle.exists() for task in (job._sub_jobs or [job]))


ACTIVE = {"PD", "R", "CG", "CF", "RQ", "RS", "RH", "RF", "S", "SI", "SO", "ST"}  # squeue's states of a live job


def _queued(arrays: Any) -> Optional[set]:
    """The ids (ARRAY_TASK) of the arrays' jobs still pending, running or being requeued; None when
    squeue could not tell. (squeue, not sacct: a cluster may keep no accounting, and a requeued
    job is still in the queue.)"""
    import subprocess

    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %t", "-j", ",".join(sorted(arrays))],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        if "invalid job id" in done.stderr.lower():  # gone from the queue: ended a while ago
            return set()
        return None  # squeue itself failed: asked again next time
    rows = [line.split() for line in done.stdout.splitlines()]
    return {row[0] for row in rows if len(row) == 2 and row[1] in ACTIVE}


def _base_conf() -> Any:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    return BaseQueueConf


class _Stop:
    """While a parallel sweep runs: the first SIGINT or SIGTERM starts no more jobs and lets the
    running ones stop after their current step (Ctrl-C reaches them from the terminal; SIGTERM is
    passed on to them). The sweep then ends with 128 + the signal."""

    def __init__(self, running: Dict[int, tuple]) -> None:
        self.running = running
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            log.warning(f"{signal.Signals(signum).name} received: no more jobs start; the {len(self.running)} "
                        "running stop after their current step and keep their checkpoints.")
        if signum == signal.SIGTERM:
            for job, _, _ in self.running.values():
                if job._process is not None and job._process.poll() is None:
                    job._process.send_signal(signal.SIGTERM)  # submitit's controller passes it on

    def __enter__(self) -> "_Stop":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@contextmanager
def _environment(values: Dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while a job process starts (it copies the environment)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_sigint() -> Iterator[None]:
    """submitit's job controller starts with SIGINT ignored: Ctrl-C reaches the job itself from the
    terminal and stops it after its step, where the controller would kill it a second later. The
    job process puts Python's own handler back."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
