"""memjax: memory in neural networks for JAX/Flax."""
__version__ = "0.1.0"
