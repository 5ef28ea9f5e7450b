"""Hashed n-gram memory: NumPy == jnp == a pure-Python reference of the hash; segments,
decoding context, collision rate, the 1-bucket control, the gate.

Hashes are integers: compared exactly. Gate: float64 (x64 fixture) 1e-12 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.ngram_memory import (context_gate, is_prime, make_hash_params, ngram_hashes, ngram_hashes_np,
                                        ngram_lookup)

M32 = 2 ** 32


def fmix(h):
    """MurmurHash3's 32-bit finaliser on a Python int (the reference the hashes are checked against)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % M32
    return h ^ (h >> 16)


def python_hash(tokens, segment_ids, params):
    """Pure-Python big-int reference written from the docstring equation (masking to 32 bits)."""
    b, t = len(tokens), len(tokens[0])
    out = np.zeros((b, t, params.num_heads), np.int64)

    for bi in range(b):
        for ti in range(t):
            col = 0
            for n in params.orders:
                h = 0
                for s in range(n):
                    p = ti - s
                    same = p >= 0 and (segment_ids is None or segment_ids[bi][p] == segment_ids[bi][ti])
                    x = int(tokens[bi][p]) if same else params.pad_id
                    h ^= (x * params.multipliers[s]) % M32
                f = fmix(h)
                for _ in range(params.heads):
                    out[bi, ti, col] = f % params.table_sizes[col]
                    col += 1
    return out


def test_numpy_jnp_and_python_reference_agree():
    params = make_hash_params(max_ngram=4, heads=2, table_size=1000, layer=3, seed=7, pad_id=5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2 ** 31, size=(2, 13))  # large ids: the products overflow 32 bits
    tokens[:, :3] = [[0, 1, 2], [5, 5, 5]]
    seg = np.repeat([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]], 2, axis=0)
    for segment_ids in (None, seg):
        ref = python_hash(tokens.tolist(), None if segment_ids is None else segment_ids.tolist(), params)
        got_np = ngram_hashes_np(tokens, params, segment_ids=segment_ids)
        got_j = jax.jit(lambda t, s: ngram_hashes(t, params, segment_ids=s))(
            jnp.asarray(tokens, jnp.int32 if tokens.max() < 2 ** 31 else jnp.uint32),
            None if segment_ids is None else jnp.asarray(segment_ids))
        assert got_np.shape == (2, 13, params.num_heads) and got_np.dtype == np.int32
        np.testing.assert_array_equal(got_np, ref)
        np.testing.assert_array_equal(np.asarray(got_j), ref)
        assert np.all(got_np < np.asarray(params.table_sizes))


def test_packed_equals_separate_documents_and_context_chaining():
    params = make_hash_params(max_ngram=3, heads=3, table_size=97)
    rng = np.random.default_rng(1)
    lengths = [1, 6, 2, 9]
    tokens = rng.integers(1, 500, size=(1, sum(lengths)))
    seg = np.repeat(np.arange(1, 5), lengths)[None]
    packed = ngram_hashes_np(tokens, params, segment_ids=seg)
    start = 0
    for n in lengths:
        np.testing.assert_array_equal(packed[:, start:start + n], ngram_hashes_np(tokens[:, start:start + n], params))
        start += n
    # Decoding: the hashes of a suffix given the preceding ids as context equal the full pass.
    full = ngram_hashes_np(tokens, params)
    for cut in (1, 2, 7):
        ctx = np.pad(tokens[:, :cut], ((0, 0), (2, 0)))[:, -2:]  # pad id 0 before the start
        np.testing.assert_array_equal(ngram_hashes_np(tokens[:, cut:], params, context=ctx), full[:, cut:])
        np.testing.assert_array_equal(np.asarray(ngram_hashes(jnp.asarray(tokens[:, cut:]), params,
                                                              context=jnp.asarray(ctx))), full[:, cut:])


def test_parameters_are_deterministic_distinct_primes_and_odd_multipliers():
    a = make_hash_params(max_ngram=3, heads=4, table_size=1000, layer=2, seed=1)
    assert a == make_hash_params(max_ngram=3, heads=4, table_size=1000, layer=2, seed=1)
    b = make_hash_params(max_ngram=3, heads=4, table_size=1000, layer=3, seed=1)
    assert a.multipliers != b.multipliers  # per-layer multipliers
    assert len(set(a.table_sizes)) == len(a.table_sizes) == 8
    assert all(is_prime(p) and p >= 1000 for p in a.table_sizes)
    assert all(m % 2 == 1 and 0 < m < M32 for m in a.multipliers)
    assert list(a.offsets) == [0, *np.cumsum(a.table_sizes)[:-1]] and a.total_rows == sum(a.table_sizes)


def test_collision_rate_matches_uniform_hashing():
    """M distinct random bigrams into p rows: colliding pairs ~ Poisson(M (M - 1) / (2 p)) per head."""
    params = make_hash_params(max_ngram=2, heads=2, table_size=10007, layer=0)
    rng = np.random.default_rng(2)
    m = 3000
    pairs = set()
    while len(pairs) < m:
        pairs.add(tuple(rng.integers(0, 32000, size=2)))
    tokens = np.array(sorted(pairs))  # each row: one bigram at position 1
    h = ngram_hashes_np(tokens, params)[:, 1]  # [M, heads]
    for j, p in enumerate(params.table_sizes):
        _, counts = np.unique(h[:, j], return_counts=True)
        colliding_pairs = int(np.sum(counts * (counts - 1) // 2))
        expected = m * (m - 1) / (2 * p)  # ~449.6
        assert abs(colliding_pairs - expected) < 5 * np.sqrt(expected), (colliding_pairs, expected)
    # With two distinct primes, a bigram pair collides in both heads ~ M^2 / (2 p1 p2) ~ 0.04 times.
    _, both = np.unique(h, axis=0, return_counts=True)
    assert np.sum(both > 1) <= 2


def test_one_bucket_control():
    params = make_hash_params(max_ngram=3, heads=2, one_bucket=True)
    assert params.table_sizes == (1, 1, 1, 1) and params.total_rows == 4
    h = ngram_hashes_np(np.arange(20).reshape(2, 10), params)
    assert np.all(h == 0)
    table = jnp.arange(8.0).reshape(4, 2)
    np.testing.assert_array_equal(ngram_lookup(table, jnp.asarray(h), params)[0, 0], jnp.arange(8.0))


def test_lookup_concatenates_heads():
    params = make_hash_params(max_ngram=3, heads=1, table_size=5)  # tables of 5 and 7 rows
    table = jnp.arange(12 * 3.0).reshape(12, 3)
    h = jnp.array([[[4, 6]]])
    np.testing.assert_array_equal(ngram_lookup(table, h, params)[0, 0], jnp.concatenate([table[4], table[5 + 6]]))
    with pytest.raises(ValueError, match="table must be"):
        ngram_lookup(table[:11], h, params)
    with pytest.raises(ValueError, match="hashes must be"):
        ngram_lookup(table, h[..., :1], params)


def test_context_gate(x64):
    rng = np.random.default_rng(0)
    k, h = jnp.asarray(rng.standard_normal((3, 4, 8))), jnp.asarray(rng.standard_normal((3, 4, 8)))
    g = context_gate(k, h)
    s = np.sum(np.asarray(k) * np.asarray(h), axis=-1, keepdims=True) / np.sqrt(8)
    ref = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(np.abs(s))))
    assert g.shape == (3, 4, 1) and np.max(np.abs(np.asarray(g) - ref)) < 1e-12
    # Finite gradient where the score is exactly zero (d sqrt|s| / ds is infinite there).
    grad = jax.grad(lambda k: context_gate(k, jnp.zeros_like(k)).sum())(k)
    assert np.all(np.isfinite(np.asarray(grad)))
    with pytest.raises(ValueError, match="same shape"):
        context_gate(k, h[..., :4])


def test_validation():
    params = make_hash_params()
    with pytest.raises(ValueError, match="tokens must be"):
        ngram_hashes_np(np.zeros(5, int), params)
    with pytest.raises(ValueError, match="segment_ids must be"):
        ngram_hashes_np(np.zeros((2, 5), int), params, segment_ids=np.zeros((2, 4), int))
    with pytest.raises(ValueError, match="context must be"):
        ngram_hashes(jnp.zeros((2, 5), int), params, context=jnp.zeros((2, 3), int))
    for kw, msg in [({"max_ngram": 1}, "max_ngram"), ({"heads": 0}, "heads"), ({"table_size": 1}, "table_size"),
                    ({"pad_id": -1}, "pad_id")]:
        with pytest.raises(ValueError, match=msg):
            make_hash_params(**kw)
