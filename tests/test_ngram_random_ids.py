"""The random-ids control of the hashed n-gram memory (``random_ids=True``): the hash of
content-free position ids replaces the n-gram hash.

Checked against a pure-Python reference written from the definition (``q_t = 1 + position of t
within its document``, ``0`` before the start, hashed as the tokens would be); NumPy == jnp; the
read changes with the position and never with the tokens; packed documents == separate documents;
decoding from the cache == the full sequence; exclusive with ``one_bucket``. Hashes are integers:
compared exactly; block outputs (float32) to 1e-5 relative.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.ngram_memory import (
    make_hash_params,
    ngram_hashes,
    ngram_hashes_np,
    ngram_ids,
)
from memjax.nn.ngram import NgramMemory
from tests.helpers import rel_err
from tests.test_ngram_memory import M32, fmix


def reference(segment_ids, params, b, t):
    """Pure-Python hashes of the position ids (big ints masked to 32 bits)."""
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((b, t, params.num_heads), np.int64)
    for bi in range(b):
        start = 0
        for ti in range(t):
            if ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
                start = ti

            col = 0
            for n in params.orders:
                h = 0
                for s in range(n):
                    p = ti - s
                    q = p - start + 1 if p >= start else 0  # 0 before the document's start
                    h ^= (q * params.multipliers[s]) % M32
                f = fmix(h)
                for _ in range(params.heads):
                    out[bi, ti, col] = f % params.table_sizes[col]
                    col += 1
    return out


PARAMS = make_hash_params(max_ngram=3, heads=2, table_size=97, layer=1, seed=3, pad_id=5, random_ids=True)


def test_hashes_match_the_reference_and_ignore_the_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (2, 17))
    seg = np.array([[1] * 5 + [2] * 9 + [3] * 3, [4] * 17])
    for s in (None, seg):
        want = reference(s, PARAMS, 2, 17)
        got = ngram_hashes_np(tokens, PARAMS, segment_ids=s)
        np.testing.assert_array_equal(got, want)
        got_j = ngram_hashes(jnp.asarray(tokens), PARAMS, segment_ids=None if s is None else jnp.asarray(s))
        np.testing.assert_array_equal(np.asarray(got_j), want)
        # Other tokens, same positions: the same rows.
        np.testing.assert_array_equal(ngram_hashes_np(rng.integers(0, 1000, (2, 17)), PARAMS, segment_ids=s), want)
    # ...but the rows change along the positions (a constant token sequence reads many rows).
    const = ngram_hashes_np(np.full((1, 17), 7), PARAMS)
    assert len(np.unique(const[0, :, 0])) > 8
    # The token-content hash of the same constant sequence reads one row after the first tokens.
    content = make_hash_params(max_ngram=3, heads=2, table_size=97, layer=1, seed=3, pad_id=5)
    assert len(np.unique(ngram_hashes_np(np.full((1, 17), 7), content)[0, 2:, 0])) == 1


def test_packed_documents_and_decoding_context():
    tokens = np.random.default_rng(1).integers(0, 50, (2, 15))
    seg = np.array([[1] * 6 + [2] * 9] * 2)
    packed = ngram_hashes_np(tokens, PARAMS, segment_ids=seg)
    np.testing.assert_array_equal(packed[:, :6], ngram_hashes_np(tokens[:, :6], PARAMS))
    np.testing.assert_array_equal(packed[:, 6:], ngram_hashes_np(tokens[:, 6:], PARAMS))
    full = ngram_hashes_np(tokens, PARAMS)
    for cut in (1, 4):
        ctx = ngram_ids(tokens[:, :cut], PARAMS)
        ctx = np.concatenate([np.zeros((2, 2), ctx.dtype), ctx], 1)[:, -2:]  # last max_ngram - 1 ids
        np.testing.assert_array_equal(ngram_hashes_np(tokens[:, cut:], PARAMS, context=ctx), full[:, cut:])
        np.testing.assert_array_equal(
            np.asarray(ngram_hashes(jnp.asarray(tokens[:, cut:]), PARAMS, context=jnp.asarray(ctx))), full[:, cut:])
    # The ids restart at 1 in every document.
    np.testing.assert_array_equal(ngram_ids(tokens, PARAMS, segment_ids=seg)[0],
                                  [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7, 8, 9])


def test_seed_and_layer_change_the_rows():
    other = make_hash_params(max_ngram=3, heads=2, table_size=97, layer=2, seed=3, random_ids=True)
    tok = np.zeros((1, 16), int)
    assert not np.array_equal(ngram_hashes_np(tok, other), ngram_hashes_np(tok, PARAMS))


def test_exclusive_with_one_bucket():
    with pytest.raises(ValueError, match="exclusive"):
        make_hash_params(one_bucket=True, random_ids=True)
    with pytest.raises(ValueError, match="NgramMemory: one_bucket and random_ids"):
        NgramMemory(16, one_bucket=True, random_ids=True, rngs=nnx.Rngs(0))


def test_block_reads_positions_not_tokens_and_decodes():
    blk = NgramMemory(16, table_size=31, random_ids=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 11, 16)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, 64, (2, 11)), jnp.int32)
    fwd = nnx.jit(lambda m, x, t: m(x, tokens=t))
    y = fwd(blk, x, tok)
    assert rel_err(fwd(blk, x, (tok + 17) % 64), y) < 1e-6  # no token content
    # The read depends on the position: the same x at every position gives different outputs.
    same = jnp.broadcast_to(x[:, :1], x.shape)
    ys = np.asarray(fwd(blk, same, tok))
    assert np.max(np.abs(ys[:, 1:] - ys[:, :1])) > 1e-2 * np.max(np.abs(ys))
    # Decoding: a prefill then single steps reproduce the full call (the cache keeps position ids).
    decode = nnx.jit(lambda m, x, c, t: m(x, tokens=t, cache=c))
    cache = blk.init_cache(2, 16)
    y1, cache = decode(blk, x[:, :4], cache, tok[:, :4])
    outs = [y1]
    for t in range(4, 11):
        yt, cache = decode(blk, x[:, t:t + 1], cache, tok[:, t:t + 1])
        outs.append(yt)
    assert rel_err(jnp.concatenate(outs, 1), y) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.context), [[10, 11]] * 2)
