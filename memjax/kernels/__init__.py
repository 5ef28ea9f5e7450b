"""Pallas kernels with pure-jnp references and ``impl="auto"`` dispatch.

``embedding_bag`` (gather + weighted sum; :mod:`memjax.kernels.embedding_bag_ops` holds its
dispatch tables) and ``chunk_recurrence`` (the chunk-to-chunk state pass of the chunked matrix
memories; :mod:`memjax.kernels.chunk_pass` holds its dispatch tables) are functions here. No
function shares its name with a submodule, so ``import memjax.kernels.chunk_pass as m`` is
always the module.
"""
from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.kernels.embedding_bag_ops import embedding_bag

__all__ = ["chunk_recurrence", "embedding_bag"]
