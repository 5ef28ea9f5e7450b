"""Grain sources and transforms: synthetic memory tasks, text files, packing.

Importing the package registers every task (``config.data.task`` names one of them).
"""
from memjax.data import copying, facts, induction, mqar, passkey, registry, text  # noqa: F401  (registration)
from memjax.data import state_tracking  # noqa: F401  (registers "parity", "word_problem")
from memjax.data.registry import get_task, known_tasks, register_task

__all__ = ["get_task", "known_tasks", "register_task"]
