"""Pallas kernels with pure-jnp references and ``impl="auto"`` dispatch."""
from memjax.kernels.embedding_bag import embedding_bag

__all__ = ["embedding_bag"]
