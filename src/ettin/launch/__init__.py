"""Slurm launching: one job per (size, objective, phase), chained, requeued, watched.

- :mod:`ettin.launch.runs`: which runs a submission holds, their folders and what each starts from;
- :mod:`ettin.launch.slurm_job`: the sbatch script of a run (through submitit) and its requeue rule;
- :mod:`ettin.launch.cluster`: the few Slurm client calls (ping, job state, cancel);
- :mod:`ettin.launch.registry`: ``jobs.json`` / ``jobs.txt`` in the run root;
- :mod:`ettin.launch.submit`, :mod:`ettin.launch.status`: ``ettin launch submit|status|cancel``
  (also ``python -m launch.submit|status|cancel`` from the repo, or anywhere once installed);
- :mod:`ettin.launch.plan`: ``ettin plan``, tokens, steps, checkpoints and GPU-hours per run.

Nothing here imports torch: submitting and planning stay fast on a login node.
"""
