"""Pallas kernels with pure-jnp references and ``impl="auto"`` dispatch.

``embedding_bag`` (the function) is exported here; the chunk-to-chunk state pass lives in
:mod:`memjax.kernels.chunk_recurrence` (``chunk_recurrence.chunk_recurrence``), kept as a module
so that its dispatch tables stay reachable by name.
"""
from memjax.kernels.embedding_bag import embedding_bag

__all__ = ["embedding_bag"]
