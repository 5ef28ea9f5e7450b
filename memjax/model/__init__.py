"""The decoder LM assembled from a block pattern, its sharding rules, decoding, and its part of
config validation (registered on import)."""
from memjax.model import config_check  # noqa: F401  (registers the model's config checks)
from memjax.model.decode import generate
from memjax.model.lm import LM, block_arguments, block_names, pattern_names

__all__ = ["LM", "block_arguments", "block_names", "generate", "pattern_names"]
