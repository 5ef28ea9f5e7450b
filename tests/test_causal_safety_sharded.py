"""The non-finite guard under sequence parallelism (issue 19, item 1, with ``seq_axis``).

With time split over a ``seq`` mesh axis of 4 devices inside ``jax.shard_map`` (float64), a NaN in
the per-token inputs at global token ``t`` of a row must give what it gives on one device:

- every output before ``t`` and every output of another document (packed rows whose documents
  span shards, start inside a shard or exactly at a shard's first token) is bit-identical to the
  output of the clean input, and so are the gradients of those outputs with respect to every
  input (at the kept tokens for the per-token inputs, everywhere for the parameters);
- the NaN positions of the outputs and of the final state are exactly the single-device guard's
  (:mod:`memjax.memory.nonfinite`): a bad write poisons the rest of its document on every later
  shard, a bad read only its own token;
- the finite outputs equal the single-device ones (to round-off: the sharded passes are other
  arithmetic).

Also :func:`memjax.memory.nonfinite.running` with ``axis_name`` against the single-device rule on
many random patterns and documents. Without the cross-shard carry the NaN masks differ (a poison
stops at its shard's end) and, without the sanitising, every shard after the NaN is NaN.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax.memory import nonfinite
from memjax.memory.attention import causal_attention
from memjax.memory.delta import delta_rule
from memjax.memory.delta_product import delta_product
from memjax.memory.dplr import dplr_delta_rule
from memjax.memory.gdn2 import gdn2
from memjax.memory.linear import linear_attention
from memjax.memory.log_linear import log_linear_attention, num_levels
from memjax.memory.log_linear_delta import log_linear_delta_rule
from memjax.memory.mamba3 import mamba3
from memjax.memory.mixture import mixture_of_memories
from memjax.memory.mlstm import mlstm
from memjax.memory.rg_lru import rglru
from memjax.memory.ring_attention import ring_attention
from memjax.memory.ssm import diagonal_ssm, selective_scan

SHARDS = 4
B, T, H, K, V = 2, 16, 2, 4, 4  # 4 tokens per shard: shards [0, 4), [4, 8), [8, 12), [12, 16)
CHUNK = 2

# Row 0: documents [0, 3), [3, 13) (over all four shards, wholly covering shard 2), [13, 16).
# Row 1: documents [0, 8) and [8, 16), the second starting exactly at shard 2's first token.
PACKED = np.array([[0] * 3 + [1] * 10 + [2] * 3, [0] * 8 + [1] * 8], np.int32)
ONE_DOC = np.zeros((B, T), np.int32)
# (segment ids, the poisoned token of each row, which per-token inputs get the NaN: all or the first)
SCENARIOS = (
    (PACKED, (5, 2), "all"),  # -> row 0: [5, 13) over shards 1-3; row 1: [2, 8) into shard 1
    (ONE_DOC, (1, 11), "all"),  # -> to the end and the final state; row 1 from a shard's last token
    (PACKED, (9, 14), "first"),  # only the first input (a read for the attention-like memories)
)


@pytest.fixture(autouse=True)
def _x64(x64):
    yield


# (inputs built in NumPy: eager jnp ops would each compile)

def _normal(rng, *shape, scale=1.0):
    return rng.normal(size=shape) * scale


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_gate(rng, *shape):
    return -_softplus(_normal(rng, *shape) - 1.0)


# Each case: (inputs, per-token input names (time on axis 1; the first is poisoned alone in the
# "first" scenario), fn(inputs, segment_ids, seq_axis) -> (o [B, T, ...], state or None)).

def _linear(vector):
    rng = np.random.default_rng(0)
    x = dict(q=_normal(rng, B, T, H, K), k=_normal(rng, B, T, H, K), v=_normal(rng, B, T, H, V),
             g=_log_gate(rng, B, T, H, *((K,) if vector else ())))
    fn = lambda a, seg, ax: linear_attention(a["q"], a["k"], a["v"], g=a["g"], segment_ids=seg, chunk_size=CHUNK,
                                             seq_axis=ax)
    return x, ("q", "k", "v", "g"), fn


def _delta(vector):
    rng = np.random.default_rng(1)
    x = dict(q=_normal(rng, B, T, H, K), k=_unit(_normal(rng, B, T, H, K)), v=_normal(rng, B, T, H, V),
             beta=_sigmoid(_normal(rng, B, T, H)), g=_log_gate(rng, B, T, H, *((K,) if vector else ())))
    fn = lambda a, seg, ax: delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], segment_ids=seg,
                                       chunk_size=CHUNK, seq_axis=ax)
    return x, ("q", "k", "v", "beta", "g"), fn


def _gdn2():
    rng = np.random.default_rng(2)
    x = dict(q=_normal(rng, B, T, H, K), k=_unit(_normal(rng, B, T, H, K)), v=_normal(rng, B, T, H, V),
             g=_log_gate(rng, B, T, H, K), b=_sigmoid(_normal(rng, B, T, H, K)),
             w=_sigmoid(_normal(rng, B, T, H, V)))
    fn = lambda a, seg, ax: gdn2(a["q"], a["k"], a["v"], a["g"], a["b"], a["w"], segment_ids=seg, chunk_size=CHUNK,
                                 seq_axis=ax)
    return x, ("q", "k", "v", "g", "b", "w"), fn


def _dplr():
    rng = np.random.default_rng(3)
    kappa = _unit(_normal(rng, B, T, H, K))
    x = dict(q=_normal(rng, B, T, H, K), k=_normal(rng, B, T, H, K), v=_normal(rng, B, T, H, V), a=-kappa,
             b=kappa * _sigmoid(_normal(rng, B, T, H, K)), g=_log_gate(rng, B, T, H, K))
    fn = lambda a, seg, ax: dplr_delta_rule(a["q"], a["k"], a["v"], a["a"], a["b"], a["g"], segment_ids=seg,
                                            chunk_size=CHUNK, seq_axis=ax)
    return x, ("q", "k", "v", "a", "b", "g"), fn


def _delta_product():
    rng = np.random.default_rng(4)
    x = dict(q=_normal(rng, B, T, H, K), k=_unit(_normal(rng, B, T, 2, H, K)), v=_normal(rng, B, T, 2, H, V),
             beta=2 * _sigmoid(_normal(rng, B, T, 2, H)), g=_log_gate(rng, B, T, H))
    fn = lambda a, seg, ax: delta_product(a["q"], a["k"], a["v"], a["beta"], a["g"], segment_ids=seg,
                                          chunk_size=CHUNK, seq_axis=ax)
    return x, ("q", "k", "v", "beta", "g"), fn


def _ssd():
    rng = np.random.default_rng(5)
    x = dict(C=_normal(rng, B, T, 1, K, scale=0.5), x=_normal(rng, B, T, H, V),
             dt=_softplus(_normal(rng, B, T, H) - 1.0), B=_normal(rng, B, T, 1, K, scale=0.5),
             A=-np.exp(_normal(rng, H)), D=_normal(rng, H))
    fn = lambda a, seg, ax: selective_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], segment_ids=seg,
                                           chunk_size=CHUNK, seq_axis=ax)
    return x, ("C", "x", "dt", "B"), fn


def _mamba3():
    rng = np.random.default_rng(6)
    x = dict(C=_normal(rng, B, T, 1, K), x=_normal(rng, B, T, H, 3), dt=_softplus(_normal(rng, B, T, H) - 1.0),
             A=-np.exp(_normal(rng, B, T, H, scale=0.5)), B=_normal(rng, B, T, 1, K),
             lam=_sigmoid(_normal(rng, B, T, H)), theta=_normal(rng, B, T, H, 2), D=_normal(rng, H))
    fn = lambda a, seg, ax: mamba3(a["x"], a["dt"], a["A"], a["B"], a["C"], lam=a["lam"], theta=a["theta"],
                                   D=a["D"], segment_ids=seg, chunk_size=CHUNK, seq_axis=ax)
    return x, ("C", "x", "dt", "A", "B", "lam", "theta"), fn


def _mlstm():
    rng = np.random.default_rng(7)
    x = dict(q=_normal(rng, B, T, H, K), k=_normal(rng, B, T, H, K), v=_normal(rng, B, T, H, V),
             i=_normal(rng, B, T, H, scale=3.0) + 2.0, f=_normal(rng, B, T, H) + 2.0)
    fn = lambda a, seg, ax: mlstm(a["q"], a["k"], a["v"], a["i"], a["f"], segment_ids=seg, chunk_size=CHUNK,
                                  seq_axis=ax)
    return x, ("q", "k", "v", "i", "f"), fn


def _log_linear(delta):
    rng = np.random.default_rng(8)
    x = dict(q=_normal(rng, B, T, H, K), k=_unit(_normal(rng, B, T, H, K)), v=_normal(rng, B, T, H, V),
             g=_log_gate(rng, B, T, H), lam=_softplus(_normal(rng, B, T, H, num_levels(T))))
    names = ("q", "k", "v", "g", "lam")
    if delta:
        x["beta"] = _sigmoid(_normal(rng, B, T, H))
        fn = lambda a, seg, ax: log_linear_delta_rule(a["q"], a["k"], a["v"], a["beta"], a["lam"], g=a["g"],
                                                      segment_ids=seg, chunk_size=CHUNK, seq_axis=ax)
        return x, names + ("beta",), fn
    fn = lambda a, seg, ax: log_linear_attention(a["q"], a["k"], a["v"], a["g"], a["lam"], segment_ids=seg,
                                                 chunk_size=CHUNK, seq_axis=ax)
    return x, names, fn


def _rglru():
    rng = np.random.default_rng(9)
    x = dict(x=_normal(rng, B, T, V), gate_a=_normal(rng, B, T, V), gate_x=_normal(rng, B, T, V),
             lam=_normal(rng, V) + 2.0)
    fn = lambda a, seg, ax: rglru(a["x"], a["gate_a"], a["gate_x"], a["lam"], segment_ids=seg, seq_axis=ax)
    return x, ("x", "gate_a", "gate_x"), fn


def _diagonal():
    rng = np.random.default_rng(10)
    x = dict(x=_normal(rng, B, T, H), A=-np.exp(_normal(rng, H, K)), B=_normal(rng, H, K), C=_normal(rng, H, K),
             dt=np.exp(_normal(rng, H) - 2.0), D=_normal(rng, H))
    fn = lambda a, seg, ax: diagonal_ssm(a["x"], a["A"], a["B"], a["C"], a["dt"], D=a["D"], segment_ids=seg,
                                         mode="scan", seq_axis=ax)
    return x, ("x",), fn


def _mixture(memory):
    rng = np.random.default_rng(11)
    x = dict(q=_normal(rng, B, T, H, K), k=_unit(_normal(rng, B, T, 3, H, K)), v=_normal(rng, B, T, 3, H, V),
             router=_normal(rng, B, T, 2), g=_log_gate(rng, B, T, 3, H))
    names = ("q", "k", "v", "router", "g")
    if memory == "delta":
        x["beta"] = _sigmoid(_normal(rng, B, T, 3, H))
        names += ("beta",)
    fn = lambda a, seg, ax: mixture_of_memories(a["q"], a["k"], a["v"], a["router"], top_k=1, beta=a.get("beta"),
                                                g=a["g"], memory=memory, segment_ids=seg, chunk_size=CHUNK,
                                                seq_axis=ax)
    return x, names, fn


def _ring(layout):
    rng = np.random.default_rng(12)
    x = dict(q=_normal(rng, B, T, H, K), k=_normal(rng, B, T, H, K), v=_normal(rng, B, T, H, V))

    def fn(a, seg, ax):
        if ax is None:
            return causal_attention(a["q"], a["k"], a["v"], segment_ids=seg, impl="xla"), None
        return ring_attention(a["q"], a["k"], a["v"], seq_axis=ax, segment_ids=seg, layout=layout), None

    return x, ("q", "k", "v"), fn


CASES = {
    "linear_attention": lambda: _linear(False), "gla_vector_gates": lambda: _linear(True),
    "delta_rule": lambda: _delta(False), "kda": lambda: _delta(True), "gdn2": _gdn2, "dplr_rwkv7": _dplr,
    "delta_product": _delta_product, "mamba2_ssd": _ssd, "mamba3": _mamba3, "mlstm": _mlstm,
    "log_linear": lambda: _log_linear(False), "log_linear_delta": lambda: _log_linear(True), "rglru": _rglru,
    "diagonal_ssm": _diagonal, "mixture_linear": lambda: _mixture("linear"), "mixture_delta": lambda: _mixture("delta"),
    "ring_attention": lambda: _ring("auto"), "ring_attention_contiguous": lambda: _ring("contiguous"),
}
# The per-token inputs that are reads: a NaN there poisons its own token only (the others are writes:
# the rest of the document).
READS = {"log_linear": ("q", "lam"), "log_linear_delta": ("q", "lam"), "mamba2_ssd": ("C",), "mamba3": ("C",),
         "rglru": (), "diagonal_ssm": ()}
# Default run (compiles dominate its cost): these four forward and backward, also against the
# single-device run; the others forward against the rule above, except SLOW, whose guard is another
# case's code (KDA, GLA: delta_rule's, linear_attention's; DeltaProduct: delta_rule's; MoM over the
# delta rule: MoM's) and whose cross-shard pass is too (the log-linear delta rule: sharded_levels;
# ring attention's contiguous layout: its zig-zag one's ring). The slow run: every memory both ways.
GRAD_DEFAULT = ("linear_attention", "delta_rule", "mamba2_ssd", "rglru")
SLOW = ("gla_vector_gates", "kda", "delta_product", "log_linear_delta", "mixture_delta", "ring_attention_contiguous")


def _mesh():
    return jax.make_mesh((SHARDS,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SHARDS])


def _runners(name, grad):
    """``(inputs, per-token names, sharded(a, seg, keep) -> (o, state, grads or None),
    single(a, seg) -> (o, state))``, each jitted (compiled at its first call); ``grads``: of
    ``sum(o[keep])``."""
    x, names, fn = CASES[name]()
    params = tuple(n for n in x if n not in names)

    def sharded_fwd(a, seg):
        per_token, other = {n: a[n] for n in names}, {n: a[n] for n in params}
        body = lambda pt, ot, s: fn({**pt, **ot}, s, "seq")
        return jax.shard_map(body, mesh=_mesh(), in_specs=(P(None, "seq"), P(), P(None, "seq")),
                             out_specs=(P(None, "seq"), P()))(per_token, other, seg)

    @jax.jit
    def sharded(a, seg, keep):
        if not grad:
            return (*sharded_fwd(a, seg), None)
        (o, s), vjp = jax.vjp(lambda a: sharded_fwd(a, seg), a)
        ct = jnp.broadcast_to(keep.reshape(keep.shape + (1,) * (o.ndim - 2)), o.shape).astype(o.dtype)
        return o, s, vjp((ct, jax.tree.map(jnp.zeros_like, s)))[0]

    return x, names, sharded, jax.jit(lambda a, seg: fn(a, seg, None))


def _poisoned(x, names, rows_t, which):
    hit = names if which == "all" else names[:1]
    out = {n: v.copy() for n, v in x.items()}
    for n in hit:
        out[n][np.arange(B), list(rows_t)] = np.nan
    return out


def _kept(seg, rows_t):
    """``[B, T]`` bool: the tokens a poison at ``rows_t`` must not touch (before it, other documents)."""
    t = np.arange(T)
    return np.stack([~((seg[r] == seg[r, p]) & (t >= p)) for r, p in enumerate(rows_t)])


def _expected_nan(name, names, seg, rows_t, which):
    """``[B, T]`` bool, the guard's rule written out: a bad write poisons the rest of its document
    (every head: the NaN fills the token's inputs), a bad read its own token."""
    if which == "first" and names[0] in READS.get(name, ("q",)):
        return np.arange(T)[None] == np.asarray(rows_t)[:, None]
    return ~_kept(seg, rows_t)


def _check(name, grad):
    x, names, sharded, single = _runners(name, grad)
    for seg_np, rows_t, which in SCENARIOS:
        seg = jnp.asarray(seg_np)
        keep_np = _kept(seg_np, rows_t)
        keep = jnp.asarray(keep_np)
        dirty = _poisoned(x, names, rows_t, which)
        o_c, s_c, g_c = sharded(x, seg, keep)
        o_d, s_d, g_d = sharded(dirty, seg, keep)
        o_c, o_d = np.asarray(o_c), np.asarray(o_d)
        tag = f"{name}, poison at {rows_t} ({which})"
        assert np.isfinite(o_c).all(), tag
        # bit-identical before the poison and in the other documents, forward ...
        np.testing.assert_array_equal(o_d[keep_np], o_c[keep_np], err_msg=f"{tag}: kept outputs")
        # ... NaN exactly where the guard's rule puts it (every entry of a token), the final state
        # where the last token is ...
        want = _expected_nan(name, names, seg_np, rows_t, which)
        np.testing.assert_array_equal(np.isnan(o_d), np.broadcast_to(want.reshape(want.shape + (1,) * (o_d.ndim - 2)),
                                                                     o_d.shape), err_msg=f"{tag}: NaN positions")
        for a in jax.tree.leaves(s_d):
            if jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_array_equal(np.isnan(np.asarray(a)).reshape(B, -1).all(axis=1), want[:, -1],
                                              err_msg=f"{tag}: NaN in the final state")
                assert np.isnan(np.asarray(a)[want[:, -1]]).all() and np.isfinite(np.asarray(a)[~want[:, -1]]).all()
        if grad:  # ... and the single-device run's: the same NaN, the finite values to round-off
            o_1, s_1 = single(dirty, seg)
            o_1 = np.asarray(o_1)
            nan_1 = np.isnan(o_1)
            np.testing.assert_array_equal(np.isnan(o_d), nan_1, err_msg=f"{tag}: NaN positions vs one device")
            np.testing.assert_allclose(o_d[~nan_1], o_1[~nan_1], rtol=1e-9, atol=1e-10,
                                       err_msg=f"{tag}: vs one device")
            for a, b in zip(jax.tree.leaves(s_d), jax.tree.leaves(s_1)):  # (NaN == NaN here)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10,
                                           err_msg=f"{tag}: final state vs one device")
            # ... and backward: the kept outputs' gradients bit-identical
            for n in g_c:
                gc, gd = np.asarray(g_c[n]), np.asarray(g_d[n])
                if n in names:
                    gc, gd = gc[keep_np], gd[keep_np]
                assert np.isfinite(gc).all(), f"{tag}: gradient w.r.t. {n}"
                np.testing.assert_array_equal(gd, gc, err_msg=f"{tag}: gradient w.r.t. {n}")


def _params():
    out = []
    for name in CASES:
        slow = name in SLOW
        if name in GRAD_DEFAULT:
            out.append(pytest.param(name, True, id=f"{name}-grad", marks=[pytest.mark.slow] if slow else []))
        else:
            out.append(pytest.param(name, False, id=name, marks=[pytest.mark.slow] if slow else []))
            out.append(pytest.param(name, True, id=f"{name}-grad", marks=[pytest.mark.slow]))
    return out


@pytest.mark.parametrize("name,grad", _params())
def test_nan_under_seq_axis_is_the_single_device_nan(name, grad):
    _check(name, grad)


# ----------------------------------------------------------------------------- running over shards


def test_running_across_shards_is_the_single_device_running():
    """Random bad-write patterns and packed documents (boundaries anywhere, at shard edges too):
    the sharded mask and its last token equal the single-device ones, with and without
    segment_ids."""
    rng = np.random.default_rng(13)
    rows, t = 64, 16
    bad = rng.random((rows, t, 2)) < 0.06
    seg = np.cumsum(rng.random((rows, t)) < 0.2, axis=1).astype(np.int32)
    seg[:8] = np.repeat(np.array([0, 1, 2, 3]), 4)[None]  # documents exactly the shards
    seg[8:16] = 0  # one document

    def sharded(bad, seg):
        def body(b, s):
            m = nonfinite.running(b, s, axis_name="seq")
            return m, nonfinite.last_token(m, "seq")
        return jax.shard_map(body, mesh=_mesh(), in_specs=(P(None, "seq"), P(None, "seq")),
                             out_specs=(P(None, "seq"), P()))(bad, seg)

    def sharded_no_seg(bad):
        body = lambda b: nonfinite.running(b, None, axis_name="seq")
        return jax.shard_map(body, mesh=_mesh(), in_specs=P(None, "seq"), out_specs=P(None, "seq"))(bad)

    got, last = jax.jit(sharded)(bad, seg)
    got_no_seg = jax.jit(sharded_no_seg)(bad)
    want, want_no_seg = jax.jit(lambda b, s: (nonfinite.running(b, s), nonfinite.running(b, None)))(bad, seg)
    want = np.asarray(want)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(last), want[:, -1])
    np.testing.assert_array_equal(np.asarray(got_no_seg), np.asarray(want_no_seg))
    assert want[:, 4:][~bad[:, 4:]].any()  # poisons do cross into later shards here
