"""Sequence parallelism for the catalogue memories (issue 18): with time split over a ``seq`` mesh
axis inside ``jax.shard_map``, every memory must give the single-device result in float64:
outputs, final state and every gradient, with an initial state and packed documents whose
boundaries fall inside shards, exactly at a shard boundary and across several shards.

The single-device chunked forms are tested against token-by-token references in each memory's own
test file; here the sharded result is also compared with the single-device *recurrent* form, so
that a bug shared by the chunked paths cannot hide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax.memory.delta import delta_rule
from memjax.memory.dplr import dplr_delta_rule
from memjax.memory.gdn2 import gdn2
from memjax.memory.linear import linear_attention
from memjax.nn.registry import get_block
from tests.helpers import rel_err

SHARDS = 4
B, T, H, K, V = 2, 32, 2, 4, 3
CHUNK = 4


@pytest.fixture(autouse=True)
def _x64(x64):
    yield


def seq_mesh(n=SHARDS):
    return jax.make_mesh((n,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def sharded(fn, time_args, other_args, n=SHARDS):
    """``fn(*time_args, *other_args)`` with every time_arg (``[B, T, ...]``) split over 'seq'."""
    specs = (tuple(P(None, "seq") for _ in time_args), tuple(P() for _ in other_args))
    f = jax.shard_map(lambda t, o: fn(*t, *o), mesh=seq_mesh(n), in_specs=specs, out_specs=(P(None, "seq"), P()))
    return f(tuple(time_args), tuple(other_args))


def segments(t=T, shard_len=T // SHARDS):
    """Row 0: a boundary inside shard 0, one exactly at shard 1's first token, one inside shard 2.
    Row 1: one document over shards 0-2, a boundary exactly at the last shard's first token."""
    ids = np.zeros((B, t), np.int32)
    ids[0, 3:] += 1
    ids[0, shard_len:] += 1
    ids[0, 2 * shard_len + 3:] += 1
    ids[1, 3 * shard_len:] += 1
    return jnp.asarray(ids)


def normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape))


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def check(call, time_args: dict, other_args: dict, *, atol=1e-10, grad=True):
    """``call(**time_args, **other_args, mode=..., seq_axis=...) -> (o [B, T, ...], state)``: the sharded
    chunked form equals the single-device recurrent form in its outputs, final state and (``grad``)
    the gradients of a random projection of both with respect to every floating input."""
    names = list(time_args) + list(other_args)
    n_t = len(time_args)
    args = tuple(time_args.values()) + tuple(other_args.values())
    floating = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

    def run(a, shard):
        if not shard:
            return call(**dict(zip(names, a)), mode="recurrent", seq_axis=None)
        local = lambda *x: call(**dict(zip(names, x)), mode="chunked", seq_axis="seq")
        return sharded(local, a[:n_t], a[n_t:])

    shapes = jax.eval_shape(lambda *a: run(a, False), *args)
    rng = np.random.default_rng(7)
    weights = [normal(rng, *x.shape) for x in jax.tree.leaves(shapes)]

    def loss(shard):
        def f(fl):
            a = list(args)
            for i, x in zip(floating, fl):
                a[i] = x
            out = run(tuple(a), shard)
            return sum(jnp.sum(x * w) for x, w in zip(jax.tree.leaves(out), weights)), out
        return f

    fl = tuple(args[i] for i in floating)
    results = []
    for shard in (False, True):
        f = jax.value_and_grad(loss(shard), has_aux=True) if grad else (lambda fl, f=loss(shard): (f(fl), None))
        (_, out), g = jax.jit(f)(fl)
        results.append((out, g))
    (ref, g_ref), (got, g_sh) = results
    for what, a, b in (("outputs", ref[0], got[0]), *(("final state", x, y) for x, y in
                                                       zip(jax.tree.leaves(ref[1]), jax.tree.leaves(got[1])))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol, err_msg=what)
    if grad:
        for i, a, b in zip(floating, g_ref, g_sh):
            scale = max(1.0, float(jnp.max(jnp.abs(a))))
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol * scale,
                                       err_msg=f"gradient of {names[i]}")
    return got


# ----------------------------------------------------------------------------- matrix memories


@pytest.mark.slow
def test_vector_gated_linear_attention_with_bonus_sharded():
    """GLA / RWKV-6: per-key-channel g and the bonus u, grouped value heads (HV = 2 H)."""
    rng = np.random.default_rng(0)
    hv = 2 * H
    q, k = normal(rng, B, T, H, K), normal(rng, B, T, H, K)
    v = normal(rng, B, T, hv, V)
    g = -jax.nn.softplus(normal(rng, B, T, hv, K) - 1.0)
    u = normal(rng, H, K)
    s0 = normal(rng, B, hv, K, V)

    def call(q, k, v, g, seg, u, s0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return linear_attention(q, k, v, g=g, bonus=u, initial_state=s0, segment_ids=seg, mode=mode,
                                seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, g=g, seg=segments()), dict(u=u, s0=s0))


@pytest.mark.slow
def test_vector_gated_linear_attention_strong_gates_sharded():
    """Gates strong enough for the sub-chunk route (not the factored one), no bonus."""
    rng = np.random.default_rng(1)
    q, k, v = normal(rng, B, T, H, K), normal(rng, B, T, H, K), normal(rng, B, T, H, V)
    g = -jax.nn.softplus(normal(rng, B, T, H, K) + 4.0) * 8.0
    s0 = normal(rng, B, H, K, V)

    def call(q, k, v, g, seg, s0, mode, seq_axis):
        kw = dict(chunk_size=8) if mode == "chunked" else {}
        return linear_attention(q, k, v, g=g, initial_state=s0, segment_ids=seg, mode=mode, seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, g=g, seg=segments()), dict(s0=s0))


def test_kda_grouped_value_heads_sharded():
    """KDA: delta_rule with per-key-channel g, grouped value heads (HV = 2 H)."""
    rng = np.random.default_rng(2)
    hv = 2 * H
    q, k = normal(rng, B, T, H, K), unit(normal(rng, B, T, H, K))
    v = normal(rng, B, T, hv, V)
    beta = jax.nn.sigmoid(normal(rng, B, T, hv))
    g = -jax.nn.softplus(normal(rng, B, T, hv, K) - 1.0)
    s0 = normal(rng, B, hv, K, V)

    def call(q, k, v, beta, g, seg, s0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return delta_rule(q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, mode=mode, seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, beta=beta, g=g, seg=segments()), dict(s0=s0))


@pytest.mark.slow
def test_gated_delta_rule_grouped_value_heads_sharded():
    """The per-head gated delta rule with grouped value heads and negative eigenvalues (beta in (0, 2))."""
    rng = np.random.default_rng(3)
    hv = 2 * H
    q, k = normal(rng, B, T, H, K), unit(normal(rng, B, T, H, K))
    v = normal(rng, B, T, hv, V)
    beta = 2 * jax.nn.sigmoid(normal(rng, B, T, hv))
    g = -jax.nn.softplus(normal(rng, B, T, hv) - 2.0)
    s0 = normal(rng, B, hv, K, V)

    def call(q, k, v, beta, g, seg, s0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return delta_rule(q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, mode=mode, seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, beta=beta, g=g, seg=segments()), dict(s0=s0))


@pytest.mark.slow
def test_gdn2_sharded():
    rng = np.random.default_rng(4)
    q, k, v = normal(rng, B, T, H, K), unit(normal(rng, B, T, H, K)), normal(rng, B, T, H, V)
    g = -jax.nn.softplus(normal(rng, B, T, H, K) - 1.0)
    b, w = jax.nn.sigmoid(normal(rng, B, T, H, K)), jax.nn.sigmoid(normal(rng, B, T, H, V))
    s0 = normal(rng, B, H, K, V)

    def call(q, k, v, g, b, w, seg, s0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return gdn2(q, k, v, g, b, w, initial_state=s0, segment_ids=seg, mode=mode, seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, g=g, b=b, w=w, seg=segments()), dict(s0=s0))


@pytest.mark.slow
def test_dplr_sharded():
    """RWKV-7's transition: a = -kappa_hat, b = kappa_hat * a_gate (eigenvalues inside the unit disc)."""
    rng = np.random.default_rng(5)
    q, k, v = normal(rng, B, T, H, K), normal(rng, B, T, H, K), normal(rng, B, T, H, V)
    kappa = unit(normal(rng, B, T, H, K))
    a, b = -kappa, kappa * jax.nn.sigmoid(normal(rng, B, T, H, K))
    g = -jax.nn.softplus(normal(rng, B, T, H, K) - 1.0)
    s0 = normal(rng, B, H, K, V)

    def call(q, k, v, a, b, g, seg, s0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return dplr_delta_rule(q, k, v, a, b, g, initial_state=s0, segment_ids=seg, mode=mode, seq_axis=seq_axis,
                               **kw)

    check(call, dict(q=q, k=k, v=v, a=a, b=b, g=g, seg=segments()), dict(s0=s0))


# ----------------------------------------------------------------------------- mLSTM, Mamba-3


# (default run: outputs and final state; gradients in the slow run)
@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mlstm_sharded(grad):
    """mLSTM: the stabilised states folded over the shards, the pass rerun from the incoming state;
    input gates large enough that exp(i) alone would overflow float32."""
    from memjax.memory.mlstm import MLSTMState, mlstm

    rng = np.random.default_rng(6)
    q, k, v = normal(rng, B, T, H, K), normal(rng, B, T, H, K), normal(rng, B, T, H, V)
    i, f = normal(rng, B, T, H) * 3.0 + 2.0, normal(rng, B, T, H) + 2.0
    i = i.at[0, 20].add(100.0)
    s0 = MLSTMState(normal(rng, B, H, K, V), normal(rng, B, H, K), normal(rng, B, H))

    def call(q, k, v, i, f, seg, C0, n0, m0, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        return mlstm(q, k, v, i, f, initial_state=MLSTMState(C0, n0, m0), segment_ids=seg, mode=mode,
                     seq_axis=seq_axis, **kw)

    check(call, dict(q=q, k=k, v=v, i=i, f=f, seg=segments()), dict(C0=s0.C, n0=s0.n, m0=s0.m), grad=grad)


def _mamba3_inputs(rank, seed):
    rng = np.random.default_rng(seed)
    p, n, grp, m = 3, 4, 1, 2
    r = () if rank is None else (rank,)
    x = normal(rng, B, T, H, *r, p)
    dt = jax.nn.softplus(normal(rng, B, T, H) - 1.0)
    A = -jnp.exp(normal(rng, B, T, H) * 0.5)
    Bm, Cm = normal(rng, B, T, grp, *r, n), normal(rng, B, T, grp, *r, n)
    lam, theta = jax.nn.sigmoid(normal(rng, B, T, H)), normal(rng, B, T, H, m)
    s0 = (normal(rng, B, H, p, n), normal(rng, B, H, rank or 1, n), normal(rng, B, H, rank or 1, p),
          normal(rng, B, H, m))
    return dict(x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, lam=lam, theta=theta, seg=segments()), dict(
        D=normal(rng, H), ssm=s0[0], k0=s0[1], x0=s0[2], angle=s0[3])


def _mamba3_call(x, dt, A, Bm, Cm, lam, theta, seg, D, ssm, k0, x0, angle, mode, seq_axis):
    from memjax.memory.mamba3 import Mamba3State, mamba3

    kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
    return mamba3(x, dt, A, Bm, Cm, lam=lam, theta=theta, D=D, initial_state=Mamba3State(ssm, k0, x0, angle),
                  segment_ids=seg, mode=mode, seq_axis=seq_axis, **kw)


@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mamba3_sharded(grad):
    """Mamba-3 SISO with the trapezoid (lam), rotations (theta), per-token A and D: the pending
    write and the angle cross the shard boundaries."""
    check(_mamba3_call, *_mamba3_inputs(None, 8), grad=grad)


@pytest.mark.slow
def test_mamba3_mimo_sharded():
    check(_mamba3_call, *_mamba3_inputs(2, 9))


# ----------------------------------------------------------------------------- blocks


call_packed = nnx.jit(lambda blk, x, seg: blk(x, segment_ids=seg))


def _block_case(name, opts):
    """A block built with seq_axis="seq", run (float32) under a mesh that splits time over 4 devices
    with packed documents, gives the output of the same block without sequence parallelism."""
    cls = get_block(name)
    with jax.enable_x64(False):
        x = jax.random.normal(jax.random.key(5), (2, 32, 32))
        seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [5, 19, 8]), np.repeat([4, 5], [8, 24])]))
        ref = call_packed(cls(32, **opts, rngs=nnx.Rngs(0)), x, seg)
        blk = cls(32, **opts, seq_axis="seq", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="seq_axis='seq'"):  # no mesh: nothing is inferred
            call_packed(blk, x, seg)
        with jax.set_mesh(seq_mesh()):
            y = call_packed(blk, x, seg)
    assert rel_err(y, ref) < 1e-4


@pytest.mark.slow
def test_gdn2_block_seq_axis_equals_single_device():
    _block_case("gdn2", dict(num_heads=2, num_v_heads=4, chunk_size=4))


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", [
    ("kda", dict(num_heads=2, chunk_size=4)), ("gla_vec", dict(num_heads=2, chunk_size=4)),
    ("hgrn2", dict(num_heads=2, chunk_size=4)), ("rwkv6", dict(num_heads=2, chunk_size=4)),
    ("rwkv7", dict(num_heads=2, chunk_size=4)), ("mlstm", dict(num_heads=2, chunk_size=4)),
    ("mamba3", dict(num_heads=2, d_state=8, chunk_size=4)),
    ("log_linear_mamba2", dict(num_heads=2, d_state=4, chunk_size=4)),
    ("log_linear_gdn", dict(num_heads=2, chunk_size=4)),
])
def test_blocks_seq_axis_equal_single_device(name, opts):
    _block_case(name, opts)


# ----------------------------------------------------------------------------- log-linear


def _log_linear_case(delta, seed):
    from memjax.memory.log_linear import LogLinearState, log_linear_attention, num_levels
    from memjax.memory.log_linear_delta import log_linear_delta_rule

    rng = np.random.default_rng(seed)
    n_lv = num_levels(T + 8)  # the initial position (5) continues the first document
    q, k, v = normal(rng, B, T, H, K), unit(normal(rng, B, T, H, K)), normal(rng, B, T, H, V)
    g = -jax.nn.softplus(normal(rng, B, T, H) - 1.0)
    beta = jax.nn.sigmoid(normal(rng, B, T, H))
    lam = jax.nn.softplus(normal(rng, B, T, H, n_lv))
    position = jnp.asarray([5, 3], jnp.int32)
    # only the buckets of query position - 1 hold anything: level 0 and the levels l of its set bits l - 1
    live = np.array([[l == 0 or (p - 1) >> (l - 1) & 1 for l in range(n_lv)] for p in (5, 3)], bool)
    levels = normal(rng, B, H, n_lv, K, V) * live[:, None, :, None, None]

    def call(q, k, v, g, beta, lam, seg, levels, position, mode, seq_axis):
        kw = dict(chunk_size=CHUNK) if mode == "chunked" else {}
        # (entries of empty buckets are meaningless, their gradients too: masked out)
        state = LogLinearState(levels * live[:, None, :, None, None], position)
        if delta:
            return log_linear_delta_rule(q, k, v, beta, lam, g=g, initial_state=state, segment_ids=seg, mode=mode,
                                         seq_axis=seq_axis, **kw)
        return log_linear_attention(q, k, v, g, lam, initial_state=state, segment_ids=seg, mode=mode,
                                    seq_axis=seq_axis, **kw)

    _, s = check(call, dict(q=q, k=k, v=v, g=g, beta=beta, lam=lam, seg=segments()),
                 dict(levels=levels, position=position))
    np.testing.assert_array_equal(np.asarray(s.position), [13, 8])  # the last documents' lengths


@pytest.mark.slow
def test_log_linear_attention_sharded():
    _log_linear_case(False, 10)


@pytest.mark.slow
def test_log_linear_delta_rule_sharded():
    _log_linear_case(True, 11)


def test_seq_axis_errors():
    """Outside shard_map, or with the recurrent (decoding) form, seq_axis is refused by name."""
    from memjax.memory.mamba3 import mamba3
    from memjax.memory.mlstm import mlstm

    z = jnp.zeros((1, 8, 1, 4))
    g3 = jnp.zeros((1, 8, 1))
    with pytest.raises(ValueError, match="gdn2: seq_axis 'seq' is not a mapped axis"):
        gdn2(z, z, z, z, z, z, seq_axis="seq")
    with pytest.raises(ValueError, match="delta_rule: seq_axis 'seq' is not a mapped axis"):
        delta_rule(z, z, z, g3, g=z, seq_axis="seq")
    with pytest.raises(ValueError, match="linear_attention: seq_axis 'seq' is not a mapped axis"):
        linear_attention(z, z, z, g=z, bonus=jnp.zeros((1, 4)), seq_axis="seq")
    with pytest.raises(ValueError, match="dplr_delta_rule: seq_axis needs mode='chunked'"):
        dplr_delta_rule(z, z, z, z, z, z, mode="recurrent", seq_axis="seq")
    with pytest.raises(ValueError, match="mlstm: seq_axis needs mode='chunked'"):
        mlstm(z, z, z, g3, g3, mode="recurrent", seq_axis="seq")
    with pytest.raises(ValueError, match="mamba3: seq_axis needs mode='chunked'"):
        mamba3(z, g3 + 1, -jnp.ones(1), z, z, mode="recurrent", seq_axis="seq")
    with pytest.raises(ValueError, match="mamba3: seq_axis must be a mesh axis name"):
        mamba3(z, g3 + 1, -jnp.ones(1), z, z, seq_axis=1)
