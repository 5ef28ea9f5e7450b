"""memjax: memory in neural networks for JAX/Flax.

``memjax.memory``   pure functions (linear attention, delta rule, Titans, SSMs, product keys, ...)
``memjax.kernels``  Pallas kernels with pure-jnp references (embedding_bag)
``memjax.nn``       Flax NNX blocks, registered by name for model patterns
``memjax.model``    the decoder LM, sharding and decoding
``memjax.train``    train_and_evaluate
"""
from memjax import kernels, memory
from memjax.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "kernels", "load_config", "memory"]
