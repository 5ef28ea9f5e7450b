"""The decoder LM, its sharding and decoding."""
from memjax.model.decode import generate
from memjax.model.lm import LM

__all__ = ["LM", "generate"]
