"""Chunk products of the Mamba-3 / SSD chunked forms against plain expressions (float64,
``x64`` fixture):

- ``head_chunk_decays``: the in-chunk reset counts as a 0/1 matmul instead of ``cumsum``, checked
  against decay factors written directly from the definition with several resets (segment starts
  and decays whose ``exp`` underflows) in one chunk.

The end-to-end chunked-vs-recurrent comparisons (tests/test_mamba3.py, tests/test_ssm.py,
tests/test_ssm_fast_paths.py) exercise it inside the memories.
"""
import jax
import jax.numpy as jnp
import numpy as np

from memjax.memory.chunk_products import head_chunk_decays
from tests.helpers import TOL64, rel_err, uniform


def test_head_chunk_decays_several_resets_in_a_chunk(x64):
    """Resets from segment starts and from underflowing decays, several per chunk: every factor
    against its definition (products of ``exp(g)`` since the last reset), float64."""
    b, h, z, c = 2, 2, 3, 8
    g = -uniform(7, (b, h, z, c), 0.05, 1.0, jnp.float64)
    g = g.at[0, 0, 1, 3].set(-jnp.inf).at[1, 1, 2, 0].set(-jnp.inf)  # exp = 0: a reset of that head
    rng = np.random.default_rng(8)
    seg = jnp.asarray(rng.random((b, z, c)) < 0.25)
    dec = jax.jit(head_chunk_decays, static_argnums=2)(g, seg, jnp.float64)

    gn, sn = np.asarray(g), np.asarray(seg)
    reset = np.isneginf(gn) | sn[:, None]
    gz = np.where(np.isneginf(gn), 0.0, gn)
    rc = np.cumsum(reset, axis=-1)
    G = np.zeros_like(gz)
    for i in range(c):  # inclusive sums restarted at each reset
        G[..., i] = np.where(reset[..., i], gz[..., i], (G[..., i - 1] if i else 0.0) + gz[..., i])
    keep = np.tril(np.ones((c, c), bool)) & (rc[..., :, None] == rc[..., None, :])
    matrix = np.where(keep, np.exp(np.where(keep, G[..., :, None] - G[..., None, :], 0)), 0)
    from_start = np.where(rc == 0, np.exp(G), 0)
    to_end = np.where(rc == rc[..., -1:], np.exp(G[..., -1:] - G), 0)
    chunk = np.where(rc[..., -1] == 0, np.exp(G[..., -1]), 0)
    assert rc.max() >= 2  # several resets in one chunk are exercised
    for got, want in ((dec.matrix, matrix), (dec.from_start, from_start), (dec.to_end, to_end), (dec.chunk, chunk)):
        assert rel_err(got, want) < TOL64
