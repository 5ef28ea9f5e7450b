"""Launchers: TPU pod (tpu_pod.py), SLURM GPU (slurm_gpu.py), local multi-process (local.py)."""
