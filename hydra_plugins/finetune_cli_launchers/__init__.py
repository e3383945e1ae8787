"""finetune-cli's Hydra launchers: ``hydra/launcher=parallel`` (a sweep's jobs at once on one
machine, each on its own GPUs and cores) and ``hydra/launcher=slurm`` (one SLURM job per sweep
job, data-parallel inside through srun, requeued after a time-limit or preemption warning).
Their settings are in conf/hydra/launcher/. Also the sweeper of ``hparams_search=...`` (search.py:
an Optuna study over hydra-optuna-sweeper, kept and resumed in the sweep folder)."""
