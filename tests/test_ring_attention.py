"""Ring attention (memjax.memory.ring_attention) on the 8 fake CPU devices of conftest.py: equal to
single-device attention (the XLA form of causal_attention) in float64, outputs and gradients,
with packed documents crossing devices, a window and GQA; the zig-zag re-layout; the Attention
block built with seq_axis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax.memory.attention import causal_attention
from memjax.memory.ring_attention import from_zigzag, global_document_ids, ring_attention, to_zigzag
from memjax.memory.segments import document_ids
from memjax.nn.attention import Attention
from tests.helpers import TOL64, rand, rel_err


def seq_mesh(n):
    return jax.make_mesh((n,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def packed(b, t, seed=0):
    """Segment ids whose documents (lengths 1..9) cross device boundaries, ids reused."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        ids, d = [], 0
        while len(ids) < t:
            ids += [d % 3] * int(rng.integers(1, 10))
            d += 1
        rows.append(ids[:t])
    return jnp.asarray(np.array(rows, np.int32))


def run(fn, w, *args):
    """``(o, grads of sum(o * w) w.r.t. args[:3])`` in one jitted program."""
    def f(*a):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *a[3:]), *a[:3])
        return o, vjp(w.astype(o.dtype))
    return jax.jit(f)(*args)


def ring(n, **kw):
    def fn(q, k, v, seg):
        local = lambda q, k, v, seg: ring_attention(q, k, v, seq_axis="seq", segment_ids=seg, **kw)
        return jax.shard_map(local, mesh=seq_mesh(n), in_specs=(P(None, "seq"),) * 4, out_specs=P(None, "seq"))(
            q, k, v, seg)
    return fn


def check_ring(n, t, window, layout="auto", seed=0):
    b, h, hkv, d = 2, 4, 2, 8
    q, k, v = rand(seed, (b, t, h, d), jnp.float64), rand(seed + 1, (b, t, hkv, d), jnp.float64), \
        rand(seed + 2, (b, t, hkv, d), jnp.float64)
    seg, w = packed(b, t, seed), rand(seed + 3, (b, t, h, d), jnp.float64)
    ref, ref_grads = run(lambda q, k, v, s: causal_attention(q, k, v, segment_ids=s, window=window, impl="xla"),
                         w, q, k, v, seg)
    got, grads = run(ring(n, window=window, layout=layout, block_q=2, block_k=2), w, q, k, v, seg)
    assert rel_err(got, ref) < TOL64
    for a, r in zip(grads, ref_grads):
        assert rel_err(a, r) < TOL64


def test_ring_zigzag_equals_single_device_on_8_devices(x64):
    """T = 32 over 8 devices (zig-zag half-chunks of 2), documents crossing devices, window 7, GQA:
    outputs and gradients equal the single-device XLA form."""
    check_ring(8, 32, window=7)


@pytest.mark.slow
@pytest.mark.parametrize("n,t,window,layout", [(8, 24, 0, "auto"),  # odd local length: contiguous
                                               (4, 32, 0, "contiguous"), (4, 48, 5, "zigzag"), (2, 20, 0, "auto")])
def test_ring_layouts_equal_single_device(x64, n, t, window, layout):
    check_ring(n, t, window, layout, seed=n + t)


def test_zigzag_layout_and_global_documents():
    """Device d holds half-chunks d and 2n-1-d, from_zigzag undoes it; document ids agree across
    devices with document_ids of the whole row (up to a constant)."""
    n, t = 8, 32
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    seg = packed(2, t, seed=4)

    def local(p, s):
        z = to_zigzag(p, "seq")
        return z, from_zigzag(z, "seq"), global_document_ids(s, "seq")

    z, back, docs = jax.jit(jax.shard_map(local, mesh=seq_mesh(n), in_specs=(P(None, "seq"),) * 2,
                                          out_specs=(P(None, "seq"),) * 3))(pos, seg)
    c = t // (2 * n)
    expect = np.concatenate([np.r_[d * c:(d + 1) * c, (2 * n - 1 - d) * c:(2 * n - d) * c] for d in range(n)])
    np.testing.assert_array_equal(z[0], expect)
    np.testing.assert_array_equal(back, pos)
    ref = np.asarray(document_ids(seg))
    np.testing.assert_array_equal(np.asarray(docs) - np.asarray(docs)[:, :1], ref - ref[:, :1])


def test_ring_errors():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="not a mapped axis"):
        ring_attention(q, q, q, seq_axis="seq")
    odd = jnp.zeros((1, 12, 2, 4))  # 3 per device
    f = jax.shard_map(lambda q: ring_attention(q, q, q, seq_axis="seq", layout="zigzag"), mesh=seq_mesh(4),
                      in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    with pytest.raises(ValueError, match="zigzag' needs an even local length"):
        jax.eval_shape(f, odd)
    f = jax.shard_map(lambda q: ring_attention(q, q, q[..., :2], seq_axis="seq", layout="spiral"),
                      mesh=seq_mesh(4), in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    with pytest.raises(ValueError, match="layout must be one of"):
        jax.eval_shape(f, odd)
    f = jax.shard_map(lambda q: ring_attention(q, q, q.astype(jnp.int32), seq_axis="seq"),
                      mesh=seq_mesh(4), in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    with pytest.raises(TypeError, match="v must be floating"):
        jax.eval_shape(f, odd)


@pytest.mark.slow
def test_attention_block_with_seq_axis_equals_one_device(x64):
    """The Attention block built with seq_axis (ring attention under the mesh) == the same
    parameters without it, packed documents included; forward and parameter gradients."""
    x = rand(0, (2, 32, 32), jnp.float64)
    seg = packed(2, 32, seed=7)
    blocks = [Attention(32, num_heads=4, num_kv_heads=2, window=9, seq_axis=axis, dtype=jnp.float64,
                        rngs=nnx.Rngs(0)) for axis in (None, "seq")]

    def loss(blk, x):
        return jnp.sum(jnp.sin(blk(x, segment_ids=seg)))

    ref_l, ref_g = nnx.jit(nnx.value_and_grad(loss))(blocks[0], x)
    with jax.set_mesh(seq_mesh(8)):
        got_l, got_g = nnx.jit(nnx.value_and_grad(loss))(blocks[1], x)
    assert abs(float(got_l - ref_l)) < TOL64 * abs(float(ref_l))
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        assert rel_err(a, b) < TOL64
