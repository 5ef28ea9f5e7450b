"""memjax: memory in neural networks for JAX/Flax.

``memjax.memory``   pure functions (linear attention, delta rule, Titans, SSMs, product keys, ...)
``memjax.kernels``  Pallas kernels with pure-jnp references (embedding_bag, chunk_recurrence)
``memjax.nn``       standalone Flax NNX blocks, registered by name for model patterns
``memjax.model``    the decoder LM (scanned layers), sharding and decoding
``memjax.data``     Grain tasks and pipelines
``memjax.train``    train_and_evaluate

Importing ``memjax`` registers every block, task and config check, so
``memjax.config.validate`` sees them all.
"""
from memjax import data, kernels, memory, model, nn
from memjax.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "data", "kernels", "load_config", "memory", "model", "nn"]
