"""Log-linear attention and the log-linear gated delta rule (memjax.memory.log_linear,
memjax.memory.log_linear_delta) and their blocks (memjax.nn.log_linear).

Reference: a float64 ``lax.scan`` over key positions written from the equation, independent of the
Fenwick stack the implementation carries. For every query ``t`` it keeps one state per level and
writes key ``s`` only into the level of ``t``'s Fenwick bucket that holds it; the buckets are built
as in the paper (level 0 = ``{t}``; level ``l`` = the ``2^(l-1)`` positions below ``t`` with its
lowest ``l - 1`` bits cleared, present when bit ``l - 1`` of ``t`` is set), in plain Python::

    S[t, l] <- A_s S[t, l] + [s in bucket l of t, same document] beta_s k_s v_s^T
    A_s = exp(g_s) (I - beta_s k_s k_s^T)
    o_t = scale * sum_l lambda[t, l] q_t^T S[t, l]      (read at s = t)

(``beta = 1`` and no ``k k^T`` term for log-linear attention). The final state is the last query's
``S[T - 1, l]``. Tolerances: ``TOL64`` (1e-10 relative max error) between forms and the reference
in float64 (outputs, final states, gradients w.r.t. every input); bf16 bounds ~2.5x the measured
error (noted next to them).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.delta import delta_rule
from memjax.memory.linear import linear_attention
from memjax.memory.log_linear import LogLinearState, fenwick_level, log_linear_attention, num_levels
from memjax.memory.log_linear_delta import log_linear_delta_rule
from tests.helpers import TOL64, rel_err

lla = jax.jit(log_linear_attention, static_argnames=("mode", "chunk_size"))
lld = jax.jit(log_linear_delta_rule, static_argnames=("mode", "chunk_size"))


# ----------------------------------------------------------------------------- reference


def buckets(t: int) -> dict[int, list[int]]:
    """The Fenwick partition of ``[0, t]``: level -> key positions (the paper's construction)."""
    out = {0: [t]}
    for lv in range(1, t.bit_length() + 1):
        if (t >> (lv - 1)) & 1:
            top = t - t % (1 << (lv - 1))
            out[lv] = list(range(top - (1 << (lv - 1)), top))
    return out


def positions(seg, B, T, start=None):
    """Python positions and document numbers ``[B][T]`` (positions of the first document from ``start``)."""
    pos, doc = np.zeros((B, T), int), np.zeros((B, T), int)
    for b in range(B):
        p, d = (0 if start is None else int(start[b])), 0
        for t in range(T):
            if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                p, d = 0, d + 1
            pos[b, t], doc[b, t] = p, d
            p += 1
    return pos, doc


def write_masks(seg, B, T, L):
    """``[B, Tq, Ts, L]`` 0/1: key ``s`` enters level ``l`` of query ``t`` (levels capped at ``L - 1``)."""
    pos, doc = positions(seg, B, T)
    m = np.zeros((B, T, T, L))
    for b in range(B):
        for t in range(T):
            for lv, keys in buckets(int(pos[b, t])).items():
                for ps in keys:
                    s = t - (pos[b, t] - ps)
                    assert doc[b, s] == doc[b, t]
                    m[b, t, s, min(lv, L - 1)] = 1.0
    return m


def reference(q, k, v, g, lam, beta, seg, scale, delta):
    """``(o, final levels)`` of the equation (module docstring), jnp so it differentiates."""
    B, T, H, K = q.shape
    L = lam.shape[-1]
    mask = jnp.asarray(write_masks(seg, B, T, L))  # [B, Tq, Ts, L]
    beta = jnp.ones(g.shape, q.dtype) if beta is None else beta

    def step(S, x):  # S: [B, Tq, H, L, K, V]
        s, qs, ks, vs, gs, bs, ms = x
        S = S * jnp.exp(gs)[:, None, :, None, None, None]
        if delta:
            kS = jnp.einsum("bhk,bthlkv->bthlv", ks, S)
            S = S - jnp.einsum("bhk,bthlv->bthlkv", bs[..., None] * ks, kS)
        S = S + jnp.einsum("btl,bhk,bhv->bthlkv", ms, bs[..., None] * ks, vs)
        o = scale * jnp.einsum("bhl,bhk,bhlkv->bhv", lam[:, s], qs, S[:, s])  # query s reads now
        return S, o

    S0 = jnp.zeros((B, T, H, L, K, v.shape[-1]), q.dtype)
    tm = lambda x: jnp.moveaxis(x, 1, 0)
    S, o = jax.lax.scan(step, S0, (jnp.arange(T), tm(q), tm(k), tm(v), tm(g), tm(beta), jnp.moveaxis(mask, 2, 0)))
    return tm(o), S[:, -1]


def inputs(B=2, T=37, H=2, K=4, V=3, seed=0, L=None):
    """float64 NumPy q, k (unit), v, g, lambda, beta and cotangents of o and the final levels."""
    r = np.random.default_rng(seed)
    L = L or num_levels(T)
    k = r.normal(size=(B, T, H, K))
    return dict(q=r.normal(size=(B, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=r.normal(size=(B, T, H, V)), g=-r.uniform(0.0, 0.3, size=(B, T, H)),
                lam=r.uniform(0.2, 1.5, size=(B, T, H, L)), beta=r.uniform(0.1, 1.9, size=(B, T, H)),
                co=r.normal(size=(B, T, H, V)), cs=r.normal(size=(B, H, L, K, V)))


def memory(delta, q, k, v, g, lam, beta, **kw):
    if delta:
        return lld(q, k, v, beta, lam, g=g, **kw)
    return lla(q, k, v, g, lam, **kw)


def value_and_grads(fn, x, with_state=None):
    """``(o, levels, grads)`` of ``sum(o co) + sum(levels cs)`` w.r.t. q, k, v, g, lambda, beta
    (and the initial levels ``with_state``)."""
    def loss(q, k, v, g, lam, beta, s0):
        o, s = fn(q, k, v, g, lam, beta, s0)
        return jnp.sum(o * x["co"]) + jnp.sum(s * x["cs"]), (o, s)

    args = [x[n] for n in ("q", "k", "v", "g", "lam", "beta")] + [with_state]
    argnums = (0, 1, 2, 3, 4, 5) + ((6,) if with_state is not None else ())
    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*args)
    return o, s, grads


def assert_close(got, ref, tol, label, skip_beta=False):
    o, s, grads = got
    assert rel_err(o, ref[0]) < tol, (label, "output", rel_err(o, ref[0]))
    assert rel_err(s, ref[1]) < tol, (label, "state", rel_err(s, ref[1]))
    for i, (a, b) in enumerate(zip(grads, ref[2])):
        if skip_beta and i == 5:
            continue
        assert rel_err(a, b) < tol, (label, "grad", i, rel_err(a, b))


SEG37 = np.stack([np.repeat([1, 2, 3], [7, 20, 10]), np.repeat([4, 9], [32, 5])])
SEG21 = np.stack([np.repeat([1, 2, 3], [5, 9, 7]), np.repeat([4, 9], [16, 5])])


# ----------------------------------------------------------------------------- the partition


def test_fenwick_levels_are_the_paper_partition():
    """``level(t, s) = bit_length(t XOR s)`` equals the bucket construction, the buckets partition
    ``[0, t]`` with sizes 1, 2^(l-1), and ``num_levels(T) = ceil(log2 T) + 1`` covers ``T`` positions."""
    T = 70
    got = np.asarray(fenwick_level(jnp.arange(T)[:, None], jnp.arange(T)[None, :], 64))
    for t in range(T):
        b = buckets(t)
        assert sorted(s for keys in b.values() for s in keys) == list(range(t + 1))
        for lv, keys in b.items():
            assert len(keys) == (1 if lv == 0 else 1 << (lv - 1))
            assert all(got[t, s] == lv for s in keys)
    assert [num_levels(n) for n in (1, 2, 3, 4, 5, 8, 9, 4096, 4097)] == [1, 2, 3, 3, 4, 4, 5, 13, 14]
    assert all(max(buckets(t)) <= num_levels(T) - 1 for t in range(T))


# ----------------------------------------------------------------------------- forms vs reference


@pytest.mark.parametrize("delta,packed,T,forms", [
    (False, True, 21, [("recurrent", 8), ("chunked", 8)]),
    (True, False, 21, [("chunked", 8)]),
    pytest.param(True, False, 21, [("recurrent", 8)], marks=pytest.mark.slow),
    pytest.param(False, True, 21, [("parallel", 8), ("chunked", 5)], marks=pytest.mark.slow),
    pytest.param(False, False, 37, [("recurrent", 16), ("chunked", 16), ("chunked", 5), ("parallel", 16)],
                 marks=pytest.mark.slow),
    pytest.param(True, True, 37, [("recurrent", 16), ("chunked", 16), ("chunked", 5)], marks=pytest.mark.slow),
    pytest.param(False, True, 37, [("chunked", 16), ("chunked", 5), ("chunked", 64)], marks=pytest.mark.slow),
    pytest.param(True, False, 37, [("chunked", 16), ("chunked", 5), ("chunked", 64)], marks=pytest.mark.slow)])
def test_forms_match_reference_with_gradients(x64, delta, packed, T, forms):
    """Odd T (the chunk pads the tail; chunk 5 is not a power of two; 64: one chunk); unpacked
    rows with a power-of-two chunk take the aligned path (memjax.memory.log_linear.AlignedLevels),
    packed ones and chunk 5 the general one. Outputs, final levels and position, and the
    gradients w.r.t. q, k, v, g, lambda (and beta) of every form."""
    x = inputs(T=T, seed=1 + delta)
    seg = (SEG37 if T == 37 else SEG21) if packed else None
    segj = None if seg is None else jnp.asarray(seg)
    scale = 0.7
    ref = value_and_grads(lambda q, k, v, g, lam, beta, _: reference(q, k, v, g, lam, beta if delta else None, seg,
                                                                     scale, delta), x)
    for mode, c in forms:
        def fn(q, k, v, g, lam, beta, _):
            o, s = memory(delta, q, k, v, g, lam, beta, scale=scale, segment_ids=segj, mode=mode, chunk_size=c)
            return o, s.levels
        got = value_and_grads(fn, x)
        assert got[0].dtype == got[1].dtype == jnp.float64
        assert_close(got, ref, TOL64, (delta, mode, c), skip_beta=not delta)
    _, s = memory(delta, *(jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta")), segment_ids=segj,
                  chunk_size=forms[-1][1])
    assert s.position.dtype == jnp.int32
    last_run = [T - max([0] + [t for t in range(1, T) if seg[b, t] != seg[b, t - 1]]) for b in range(2)] \
        if packed else [T, T]
    assert s.position.tolist() == last_run


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True])
def test_forms_agree_from_an_initial_state_with_gradients(x64, delta):
    """From a non-empty stack at positions (13, 6) (not chunk aligned): chunked == recurrent
    (== parallel), with the gradient w.r.t. the initial levels too."""
    x = inputs(T=21, seed=3 + delta, L=6)
    r = np.random.default_rng(7)
    lv = r.normal(size=(2, 2, 6, 4, 3))
    # Only the levels whose buckets exist hold anything (the contract; their gradients are
    # compared): last query 12 = 0b1100: {12}, {8..11}, {0..7} (levels 0, 3, 4); 5 = 0b101:
    # {5}, {4}, {0..3} (levels 0, 1, 3).
    live = np.zeros((2, 1, 6, 1, 1))
    live[0, :, [0, 3, 4]] = 1.0
    live[1, :, [0, 1, 3]] = 1.0
    start = jnp.asarray([13, 6], jnp.int32)
    forms = [("recurrent", 8), ("chunked", 8), ("chunked", 3)] + ([] if delta else [("parallel", 8)])
    results = []
    for mode, c in forms:
        def fn(q, k, v, g, lam, beta, s0):
            o, s = memory(delta, q, k, v, g, lam, beta, initial_state=LogLinearState(s0 * live, start), mode=mode,
                          chunk_size=c)
            return o, s.levels
        results.append(value_and_grads(fn, x, with_state=lv))
    for (mode, c), got in zip(forms[1:], results[1:]):
        assert_close(got, results[0], TOL64, (delta, mode, c), skip_beta=not delta)
    assert float(jnp.abs(results[0][2][-1]).max()) > 0.1  # the initial levels are read


@pytest.mark.parametrize("delta,mode", [pytest.param(False, "chunked", marks=pytest.mark.slow),
                                        pytest.param(True, "chunked", marks=pytest.mark.slow),
                                        pytest.param(False, "recurrent", marks=pytest.mark.slow),
                                        pytest.param(True, "recurrent", marks=pytest.mark.slow)])
def test_chaining_two_parts_equals_one_pass(x64, delta, mode):
    """[0:t] then [t:T] from the first part's final state == one pass (t = 13, not a chunk or
    Fenwick boundary), packed rows included; outputs, levels and positions."""
    x = inputs(T=37, seed=5)
    seg = jnp.asarray(SEG37)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta")]
    run = lambda a, **kw: memory(delta, *a, mode=mode, chunk_size=8, **kw)
    o, s = run(args, segment_ids=seg)
    first, second = [a[:, :13] for a in args], [a[:, 13:] for a in args]
    o1, s1 = run(first, segment_ids=seg[:, :13])
    o2, s2 = run(second, segment_ids=seg[:, 13:], initial_state=s1)
    assert rel_err(jnp.concatenate([o1, o2], 1), o) < TOL64
    assert rel_err(s2.levels, s.levels) < TOL64
    assert s2.position.tolist() == s.position.tolist() == [10, 5]


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True])
def test_chaining_past_the_top_level_caps_it(x64, delta):
    """L = 3 levels (exact up to 4 positions), 4 + 4 + 3 tokens chained: positions 4..10 put every
    older bucket into level 2; chunked == recurrent == the reference with capped levels."""
    x = inputs(B=1, T=11, seed=6, L=3)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta")]
    ref = reference(*args[:5], args[5] if delta else None, None, 0.5, delta)
    for mode in ("chunked", "recurrent"):
        s, outs = None, []
        for sl in (slice(0, 4), slice(4, 8), slice(8, 11)):
            o, s = memory(delta, *[a[:, sl] for a in args], initial_state=s, scale=0.5, mode=mode, chunk_size=3)
            outs.append(o)
        assert rel_err(jnp.concatenate(outs, 1), ref[0]) < TOL64, mode
        assert rel_err(s.levels, ref[1]) < TOL64 and s.position.tolist() == [11], mode


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True])
def test_packed_equals_separate_documents(x64, delta):
    """Three documents (a reused id is a new one): positions restart at each, initial_state reaches
    only the first."""
    x = inputs(B=1, T=37, seed=8)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta")]
    lengths = [11, 17, 9]
    seg = jnp.asarray(np.repeat([3, 5, 3], lengths))[None]
    _, s0 = memory(delta, *[a[:, :6] for a in args])
    o, s = memory(delta, *args, initial_state=s0, segment_ids=seg, chunk_size=8)
    parts, start = [], 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        oi, si = memory(delta, *[a[:, sl] for a in args], initial_state=s0 if i == 0 else None, mode="recurrent")
        parts.append(oi)
        start += n
    assert rel_err(o, jnp.concatenate(parts, 1)) < TOL64
    assert rel_err(s.levels, si.levels) < TOL64 and s.position.tolist() == si.position.tolist() == [9]


@pytest.mark.slow
def test_unit_level_scales_are_the_linear_time_parents(x64):
    """lambda = 1: log-linear attention is gated linear attention and the log-linear delta rule is
    the gated delta rule (outputs; the levels sum to the single state)."""
    x = inputs(T=29, seed=9)
    q, k, v, g, lam, beta = (jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta"))
    ones = jnp.ones_like(lam)
    o, s = log_linear_attention(q, k, v, g, ones, chunk_size=8)
    o_ref, s_ref = linear_attention(q, k, v, g=g, chunk_size=8)
    assert rel_err(o, o_ref) < TOL64 and rel_err(s.levels.sum(2), s_ref) < TOL64
    o, s = log_linear_delta_rule(q, k, v, beta, ones, g=g, chunk_size=8)
    o_ref, s_ref = delta_rule(q, k, v, beta, g=g, chunk_size=8)
    assert rel_err(o, o_ref) < TOL64 and rel_err(s.levels.sum(2), s_ref) < TOL64


@pytest.mark.slow
def test_no_decay_and_default_scale(x64):
    """g = None (no decay) and the default scale K^-0.5: chunked == reference."""
    x = inputs(T=19, seed=10)
    q, k, v, g, lam, _ = (jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "lam", "beta"))
    o, s = log_linear_attention(q, k, v, None, lam, chunk_size=4)
    ref = reference(q, k, v, jnp.zeros_like(g), lam, None, None, 0.5, False)
    assert rel_err(o, ref[0]) < TOL64 and rel_err(s.levels, ref[1]) < TOL64


# bf16 q, k, v, g, lambda (beta) vs the float64 reference on the same rounded inputs, T = 64,
# K = V = 16, chunk 16 (the aligned path). Measured (CPU), output / levels: attention chunked
# 3.4e-3 / 1.9e-3, recurrent 2.4e-3 / 9.8e-8; delta chunked 3.3e-3 / 1.4e-7, recurrent
# 3.3e-3 / 1.2e-7. Bounds ~2.5x.
BF16_BOUNDS = {(False, "chunked"): 8.5e-3, (False, "recurrent"): 6e-3, (True, "chunked"): 8.5e-3,
               (True, "recurrent"): 8.5e-3}


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True])
def test_bf16_error_is_bounded(delta):
    x = inputs(T=64, K=16, V=16, seed=11)
    bf = [jnp.asarray(x[n], jnp.bfloat16) for n in ("q", "k", "v", "g", "lam", "beta")]
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(a, np.float64)) for a in bf]
        ref = jax.jit(lambda *a: reference(*a[:5], a[5] if delta else None, None, 0.25, delta))(*wide)
        ref = [np.asarray(a) for a in ref]
    for mode in ("chunked", "recurrent"):
        o, s = memory(delta, *bf, mode=mode, chunk_size=16)
        assert o.dtype == jnp.bfloat16 and s.levels.dtype == jnp.float32
        err = (rel_err(o, ref[0]), rel_err(s.levels, ref[1]))
        assert max(err) < BF16_BOUNDS[delta, mode], (delta, mode, err)


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True])
def test_nan_at_a_later_token_leaves_earlier_outputs_and_gradients_unchanged(delta):
    x = inputs(T=24, seed=12)
    args = {n: jnp.asarray(x[n], jnp.float32) for n in ("q", "k", "v", "g", "lam", "beta")}
    run = lambda a: memory(delta, a["q"], a["k"], a["v"], a["g"], a["lam"], a["beta"], chunk_size=8)
    o, _ = run(args)
    for name, idx in (("k", (slice(None), 17, 1)), ("v", (slice(None), 17, 0)), ("g", (slice(None), 17)),
                      ("q", (slice(None), 17)), ("lam", (slice(None), 17, 0, 2)), ("beta", (slice(None), 17))):
        if name == "beta" and not delta:
            continue
        bad = dict(args, **{name: args[name].at[idx].set(jnp.nan)})
        ob, sb = run(bad)
        np.testing.assert_array_equal(np.asarray(ob[:, :17]), np.asarray(o[:, :17]), err_msg=name)
        if name in ("q", "lam"):  # a read: only its own token (lambda: its head)
            np.testing.assert_array_equal(np.asarray(ob[:, 18:]), np.asarray(o[:, 18:]), err_msg=name)
            assert bool(jnp.isnan(ob[:, 17, 0]).all()), name
        else:  # a write: its head's rest of the document and final state
            head = idx[2] if len(idx) > 2 else slice(None)
            assert bool(jnp.isnan(ob[:, 23, head]).all()) and bool(jnp.isnan(sb.levels[:, head]).all()), name
    grad = jax.jit(jax.grad(lambda k, v: jnp.sum(memory(delta, args["q"], k, v, args["g"], args["lam"], args["beta"],
                                                        chunk_size=8)[0][:, :17]), (0, 1)))
    clean = grad(args["k"], args["v"])
    dirty = grad(args["k"].at[:, 20, 1].set(jnp.inf), args["v"].at[:, 19, 0].set(jnp.nan))
    for a, b in zip(clean, dirty):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _ok():
    return dict(q=jnp.zeros((2, 8, 3, 4)), k=jnp.zeros((2, 8, 3, 4)), v=jnp.zeros((2, 8, 3, 5)),
                g=jnp.zeros((2, 8, 3)), level_scales=jnp.zeros((2, 8, 3, 4)))


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 8, 3))), r"q must have shape \[B, T, H, K\]"),
    (dict(v=jnp.zeros((2, 8, 2, 5))), r"v must have shape \[B, T, H, V\] = \(2, 8, 3, V\)"),
    (dict(g=jnp.zeros((2, 8, 3, 4))), r"g must have shape \[B, T, H\] = \(2, 8, 3\)"),
    (dict(level_scales=jnp.zeros((2, 8, 3))), r"level_scales must have shape \[B, T, H, L\] = \(2, 8, 3, L\)"),
    (dict(level_scales=jnp.zeros((2, 8, 3, 3))),
     r"level_scales must have L >= ceil\(log2 T\) \+ 1 = 4 levels .*got shape \(2, 8, 3, 3\)"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 5))), r"initial_state must be a LogLinearState"),
    (dict(initial_state=LogLinearState(jnp.zeros((2, 3, 5, 4, 5)), jnp.zeros((2,), jnp.int32))),
     r"initial_state.levels must have shape \[B, H, L, K, V\] = \(2, 3, 4, 4, 5\)"),
    (dict(initial_state=LogLinearState(jnp.zeros((2, 3, 4, 4, 5)), jnp.zeros((3,), jnp.int32))),
     r"initial_state.position must have shape \[B\] = \(2,\)"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape \[B, T\] = \(2, 8\)"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(mode="scan"), "mode must be one of"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match="log_linear_attention: " + match):
        log_linear_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), kw.pop("level_scales"), **kw)


def test_bad_inputs_raise_delta_and_dtypes():
    kw = _ok()
    q, k, v, lam = kw["q"], kw["k"], kw["v"], kw["level_scales"]
    with pytest.raises(ValueError, match=r"log_linear_delta_rule: beta must have shape \[B, T, H\]"):
        log_linear_delta_rule(q, k, v, None, lam)
    with pytest.raises(ValueError, match=r"log_linear_delta_rule: mode must be one of \('chunked', 'recurrent'\)"):
        log_linear_delta_rule(q, k, v, kw["g"], lam, mode="parallel")
    with pytest.raises(ValueError, match=r"log_linear_delta_rule: level_scales must have L >= "):
        log_linear_delta_rule(q, k, v, kw["g"], lam[..., :2])
    with pytest.raises(TypeError, match="log_linear_attention: level_scales must have a floating dtype"):
        log_linear_attention(q, k, v, kw["g"], jnp.zeros((2, 8, 3, 4), jnp.int32))
    with pytest.raises(TypeError, match="log_linear_attention: initial_state.position must have an integer dtype"):
        log_linear_attention(q, k, v, kw["g"], lam,
                             initial_state=LogLinearState(jnp.zeros((2, 3, 4, 4, 5)), jnp.zeros((2,))))


# ----------------------------------------------------------------------------- blocks

from memjax.nn.associative import AssociativeCache  # noqa: E402
from memjax.nn.log_linear import LogLinearGatedDeltaNet, LogLinearMamba2, LogLinearMamba2Cache  # noqa: E402
from memjax.nn.registry import get_block  # noqa: E402
import optax  # noqa: E402

from memjax.config import ModelConfig  # noqa: E402
from memjax.model.lm import LM  # noqa: E402

BLOCK_TOL = 1e-4
call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


def _blocks():
    return [LogLinearMamba2(32, num_heads=2, d_state=8, n_groups=2, chunk_size=4, num_levels=5, rngs=nnx.Rngs(1)),
            LogLinearGatedDeltaNet(32, num_heads=2, chunk_size=4, num_levels=5, allow_neg_eigval=True,
                                   rngs=nnx.Rngs(1))]


@pytest.mark.slow  # tests/test_decoding.py decodes every registered block by default
@pytest.mark.parametrize("which", [0, 1])
def test_block_prefill_then_steps_match_full_sequence(which):
    """Prefill 2 tokens (fewer than the conv width), then single steps, == the full-sequence
    (chunked) call; the cache keeps its structure and counts positions."""
    blk = _blocks()[which]
    assert get_block(("log_linear_mamba2", "log_linear_gdn")[which]) is type(blk)
    assert get_block(("LLM2", "LLD")[which]) is type(blk)
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 16)
    assert isinstance(cache0, (LogLinearMamba2Cache, AssociativeCache)[which])
    mem = cache0.memory
    assert isinstance(mem, LogLinearState) and mem.levels.shape[2] == 5 and mem.position.shape == (2,)
    y1, cache = call_cached(blk, x[:, :2], cache0)
    ys = [y1]
    for t in range(2, 11):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < BLOCK_TOL
    assert jax.tree.structure(cache) == jax.tree.structure(cache0)
    assert cache.memory.position.tolist() == [11, 11]
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_block_packed_equals_separate_documents(which):
    blk = _blocks()[which]
    x = jax.random.normal(jax.random.key(2), (1, 15, 32))
    y = call_packed(blk, x, jnp.asarray(np.repeat([1, 2, 3], 5))[None])
    parts = [call(blk, x[:, i:i + 5]) for i in (0, 5, 10)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < BLOCK_TOL


@pytest.mark.slow
def test_block_recurrent_mode_equals_chunked():
    x = jax.random.normal(jax.random.key(3), (1, 8, 16))
    for cls in (LogLinearMamba2, LogLinearGatedDeltaNet):
        a, b = (cls(16, num_heads=2, chunk_size=4, num_levels=4, mode=m, rngs=nnx.Rngs(0))
                for m in ("chunked", "recurrent"))
        assert rel_err(call(b, x), call(a, x)) < BLOCK_TOL
        with pytest.raises(ValueError, match=f"{cls.__name__}: a sequence of T = 9 tokens needs num_levels >= "
                                             r"ceil\(log2 T\) \+ 1 = 5, got num_levels = 4"):
            call(a, jnp.zeros((1, 9, 16)))


def test_block_bad_options_raise():
    for cls in (LogLinearMamba2, LogLinearGatedDeltaNet):
        name = cls.__name__
        for bad in (0, 2.5, True):
            with pytest.raises(ValueError, match=f"{name}: num_levels must be a positive int"):
                cls(16, num_levels=bad, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{name}: mode must be one of"):
            cls(16, mode="parallel", rngs=nnx.Rngs(0))
        with pytest.raises(TypeError):
            cls(16, kernel="xla", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_blocks_train_inside_the_model():
    """``pattern="LLM2,LLD"``: an LM with both blocks; a few Adam steps on one batch lower the loss."""
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern="LLM2,LLD",
                      blocks={"log_linear_mamba2": {"d_state": 8, "chunk_size": 8, "num_levels": 6},
                              "log_linear_gdn": {"chunk_size": 8, "num_levels": 6}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(4), (4, 25), 0, 48)

    @nnx.jit
    def step(model, opt, tokens):
        def loss(model):
            logits = model(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    losses = [float(step(model, opt, tokens)) for _ in range(8)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
