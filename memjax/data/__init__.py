"""Grain sources and transforms: synthetic memory tasks, text files, packing.

Importing the package registers every task (``config.data.task`` names one of them).
"""
from memjax.data import clustered_facts, copying, facts, induction, mqar, passkey, registry, text  # noqa: F401  (registration)
from memjax.data import state_tracking  # noqa: F401  (registers "parity", "word_problem")
from memjax.data.cluster_paths import ClusterPathOptions, ClusterPaths
from memjax.data.registry import get_task, known_tasks, register_task

__all__ = ["ClusterPathOptions", "ClusterPaths", "get_task", "known_tasks", "register_task"]
