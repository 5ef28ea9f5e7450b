"""Episodic key-value memory (Memorizing Transformers): the ring buffer, top-k retrieval and the
episodic block.

References (float64, written from the definitions, never from the code under test):
  * retrieval: NumPy brute force, cosine scores ``tau * <q_hat, k_hat_j>`` of every valid slot,
    ``argsort`` for the top-k, softmax over them;
  * the ring buffer: pairs written one token at a time into a Python list, the oldest dropped;
  * the block: per-token masks from the documented rule (local: same document and segment,
    ``p' <= p``; memory: same document, ``S(p) - M <= p' < S(p)``), the selection by NumPy argsort,
    then dense masked softmaxes (differentiable, for the gradient check).
Tolerance: relative max error <= 1e-10 in float64 (outputs and gradients), except where the
block's local attention enters: :func:`memjax.memory.attention.rope` rotates in float32 whatever
the input dtype, so the block's outputs and gradients are compared at 1e-6 (a wrong mask, selection
or gate is off by 1e-2 or more).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import bench_episodic
from memjax.memory.episodic import (EpisodicState, episodic_init, episodic_reset, episodic_retrieve, episodic_write,
                                    topk_attention)
from memjax.nn.episodic import EpisodicAttention, EpisodicCache
from memjax.nn.registry import get_block
from tests.helpers import TOL64, rel_err, rel_rmse

EPS = 1e-6  # the documented normalisation: x / sqrt(||x||^2 + EPS)
ROPE_TOL = 1e-6  # float32 RoPE inside the block (module docstring)


def _unit(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + EPS)


def _written_state(rng, b=2, hkv=2, m=7, d=8, dv=5, n=5):
    """A memory of ``m`` slots holding ``n`` random pairs (n < m: some slots empty)."""
    k, v = rng.normal(size=(b, n, hkv, d)), rng.normal(size=(b, n, hkv, dv))
    return episodic_write(episodic_init(b, hkv, m, d, dv, jnp.float64), jnp.asarray(k), jnp.asarray(v)), k, v


def _brute_force(q, keys, values, valid, top_k, tau):
    """Per (b, t, h): scores of the valid slots, argsort, softmax. ``keys [B, Hkv, M, D]`` normalised."""
    b, t, h, _ = q.shape
    hkv = keys.shape[1]
    qn = _unit(q)
    out = np.zeros((b, t, h, values.shape[-1]))
    scores = np.full((b, t, h, top_k), -np.inf)
    idx = np.full((b, t, h, top_k), -1)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                g = hi // (h // hkv)
                s = tau[hi] * keys[bi, g] @ qn[bi, ti, hi]
                cand = [j for j in np.argsort(-s, kind="stable") if valid[bi, j]][:top_k]
                if not cand:
                    continue
                w = np.exp(s[cand] - s[cand].max())
                w /= w.sum()
                out[bi, ti, hi] = w @ values[bi, g, cand]
                scores[bi, ti, hi, :len(cand)] = s[cand]
                idx[bi, ti, hi, :len(cand)] = cand
    return out, scores, idx


@pytest.mark.parametrize("top_k", [3, 7])  # 7 > the 5 valid slots: the hidden picks weigh nothing
def test_retrieve_equals_brute_force_top_k(x64, top_k):
    rng = np.random.default_rng(0)
    state, _, _ = _written_state(rng)
    q = rng.normal(size=(2, 3, 4, 8))  # H = 4 query heads over Hkv = 2 memory heads
    tau = np.array([2.0, 5.0, 9.0, 0.5])
    want, want_s, want_i = _brute_force(q, np.asarray(state.keys), np.asarray(state.values), np.asarray(state.valid),
                                        top_k, tau)
    for approx in (False, True):  # approx_max_k is exact off TPU
        got = jax.jit(lambda s, q: episodic_retrieve(s, q, top_k, scale=jnp.asarray(tau), approx=approx))(
            state, jnp.asarray(q))
        assert rel_err(got.output, want) < TOL64
        n = min(top_k, 5)
        np.testing.assert_array_equal(np.asarray(got.indices)[..., :n], want_i[..., :n])
        assert rel_err(np.asarray(got.scores)[..., :n], want_s[..., :n]) < TOL64
        assert np.all(np.isneginf(np.asarray(got.scores)[..., n:]))
        assert bool(got.found.all())


def test_retrieve_gradient_reaches_the_query_not_the_memory(x64):
    rng = np.random.default_rng(1)
    state, k, v = _written_state(rng)
    q = jnp.asarray(rng.normal(size=(2, 3, 4, 8)))
    co = jnp.asarray(rng.normal(size=(2, 3, 4, 5)))
    tau = jnp.asarray([2.0, 5.0, 9.0, 0.5])
    _, _, idx = _brute_force(np.asarray(q), np.asarray(state.keys), np.asarray(state.values),
                             np.asarray(state.valid), 3, np.asarray(tau))

    def ref(q, tau):  # the read with the brute-force selection held fixed, from the equation
        qn = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + EPS)
        kg = jnp.repeat(state.keys, 2, axis=1)  # [B, H, M, D]
        vg = jnp.repeat(state.values, 2, axis=1)
        s = jnp.einsum("bthd,bhmd->bthm", qn, kg) * tau[:, None]
        sel = jnp.asarray(np.eye(7, dtype=bool)[idx].any(-2))  # [B, T, H, M]
        w = jnp.where(sel, jnp.exp(s - jnp.max(jnp.where(sel, s, -jnp.inf), -1, keepdims=True)), 0.0)
        return jnp.sum(jnp.einsum("bthm,bhmv->bthv", w / w.sum(-1, keepdims=True), vg) * co)

    ours = lambda q, tau: jnp.sum(episodic_retrieve(state, q, 3, scale=tau).output * co)
    g_ours = jax.jit(jax.grad(ours, (0, 1)))(q, tau)
    for a, b in zip(g_ours, jax.jit(jax.grad(ref, (0, 1)))(q, tau)):
        assert rel_err(a, b) < TOL64
    assert float(jnp.abs(g_ours[0]).max()) > 0.0
    # nothing flows into the memory: neither into the stored pairs nor into what was written
    stored = lambda kk, vv: jnp.sum(episodic_retrieve(state._replace(keys=kk, values=vv), q, 3, scale=tau).output * co)
    gk, gv = jax.jit(jax.grad(stored, (0, 1)))(state.keys, state.values)
    assert float(jnp.abs(gk).max()) == 0.0 and float(jnp.abs(gv).max()) == 0.0

    def through_write(k, v):
        s = episodic_write(episodic_init(2, 2, 7, 8, 5, jnp.float64), k, v)
        return jnp.sum(episodic_retrieve(s, q, 3, scale=tau).output * co)

    gk, gv = jax.jit(jax.grad(through_write, (0, 1)))(jnp.asarray(k), jnp.asarray(v))
    assert float(jnp.abs(gk).max()) == 0.0 and float(jnp.abs(gv).max()) == 0.0


def test_ring_buffer_wraps_around_overwriting_the_oldest(x64):
    rng = np.random.default_rng(2)
    m, n = 4, 11
    k, v = rng.normal(size=(2, n, 1, 3)), rng.normal(size=(2, n, 1, 2))
    mask = rng.uniform(size=(2, n)) < 0.7
    mask[0] = True
    # reference: a list of (key, value, write index) of the selected tokens, keeping the newest M
    write = jax.jit(episodic_write)
    st = episodic_init(2, 1, m, 3, 2, jnp.float64)
    for a, b in ((0, 1), (1, 4), (4, 11)):  # the last call writes more than M pairs at once
        st = write(st, jnp.asarray(k[:, a:b]), jnp.asarray(v[:, a:b]), jnp.asarray(mask[:, a:b]))
    ring = EpisodicState(*(np.asarray(a) for a in st))
    for row in range(2):
        kept = [t for t in range(n) if mask[row, t]]
        count = len(kept)
        assert ring.count[row] == count
        for i, t in enumerate(kept[-m:], start=max(count - m, 0)):  # write index i -> slot i % M
            slot = i % m
            assert ring.valid[row, slot] and ring.positions[row, slot] == i
            np.testing.assert_allclose(ring.keys[row, 0, slot], _unit(k[row, t, 0]), rtol=1e-12)
            np.testing.assert_array_equal(ring.values[row, 0, slot], v[row, t, 0])
        assert ring.valid[row].sum() == min(count, m)
    # token by token (positions given) leaves the same ring
    one = episodic_init(2, 1, m, 3, 2, jnp.float64)
    for t in range(n):
        one = write(one, jnp.asarray(k[:, t:t + 1]), jnp.asarray(v[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]))
    for a, b in zip(one, st):
        np.testing.assert_array_equal(a, b)
    # a reset empties only its row
    r = jax.jit(episodic_reset)(st, jnp.asarray([True, False]))
    found = np.asarray(jax.jit(lambda s: episodic_retrieve(s, jnp.ones((2, 1, 1, 3)), 2).found)(r))
    r = EpisodicState(*(np.asarray(a) for a in r))
    assert not r.valid[0].any() and r.count[0] == 0 and np.abs(r.keys[0]).max() == 0.0
    np.testing.assert_array_equal(r.keys[1], ring.keys[1])
    assert not found[0].any() and found[1].all()


def test_bf16_read_error_is_bounded():
    rng = np.random.default_rng(3)
    q, keys, values = rng.normal(size=(2, 9, 2, 16)), _unit(rng.normal(size=(2, 12, 2, 16))), \
        rng.normal(size=(2, 12, 2, 16))
    # top_k = S: the whole softmax (a near-tie cannot swap the selection between dtypes)
    read = jax.jit(lambda q, k, v: topk_attention(q, k, v, 12, scale=4.0).output)
    ref = read(*(jnp.asarray(x, jnp.float32) for x in (q, keys, values)))
    got = read(*(jnp.asarray(x, jnp.bfloat16) for x in (q, keys, values)))
    assert got.dtype == jnp.bfloat16
    assert rel_rmse(got, ref) < 2e-2


def test_bad_inputs_raise():
    st = episodic_init(2, 2, 4, 8, 8)
    k = jnp.zeros((2, 3, 2, 8))
    with pytest.raises(ValueError, match="k must have shape"):
        episodic_write(st, jnp.zeros((2, 3, 3, 8)), k)
    with pytest.raises(TypeError, match="k must have a floating dtype"):
        episodic_write(st, k.astype(jnp.int32), k)
    with pytest.raises(TypeError, match="mask must be bool"):
        episodic_write(st, k, k, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="mask must have shape"):
        episodic_write(st, k, k, jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="state must be an EpisodicState"):
        episodic_write((st.keys, st.values), k, k)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        episodic_retrieve(st, jnp.zeros((2, 1, 2, 8)), 5)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        episodic_retrieve(st, jnp.zeros((2, 1, 2, 8)), 0)
    with pytest.raises(ValueError, match="multiple of the memory's heads"):
        episodic_retrieve(st, jnp.zeros((2, 1, 3, 8)), 2)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        episodic_retrieve(st, jnp.zeros((2, 1, 2, 8), jnp.int32), 2)
    with pytest.raises(ValueError, match=r"scale must be a number or have shape \[H\]"):
        episodic_retrieve(st, jnp.zeros((2, 1, 2, 8)), 2, scale=jnp.ones(3))
    with pytest.raises(ValueError, match="visible must have shape"):
        topk_attention(jnp.zeros((2, 1, 2, 8)), k, k, 2, visible=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="num_slots must be an int"):
        episodic_init(2, 2, 0, 8)
    with pytest.raises(ValueError, match="top_k"):
        EpisodicAttention(16, num_heads=2, memory_slots=4, top_k=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_length must be positive"):
        EpisodicAttention(16, num_heads=2, segment_length=0, rngs=nnx.Rngs(0))
    blk = EpisodicAttention(16, num_heads=2, segment_length=4, memory_slots=8, top_k=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_ids are not supported with a decoding cache"):
        blk(jnp.zeros((2, 3, 16)), segment_ids=jnp.zeros((2, 3), jnp.int32), cache=blk.init_cache(2, 8))


# ----------------------------------------------------------------------------- the block

H, HKV, D, L, M, TOPK, THETA = 2, 1, 8, 4, 6, 5, 10000.0


def _block(dtype=jnp.float64, seed=0):
    return EpisodicAttention(16, num_heads=H, num_kv_heads=HKV, segment_length=L, memory_slots=M, top_k=TOPK,
                             gate_init=0.3, dtype=dtype, rngs=nnx.Rngs(seed))


def _docs(seg):
    """Document index and position of every token (each contiguous run of an id is a document)."""
    b, t = seg.shape
    doc, pos = np.zeros((b, t), int), np.zeros((b, t), int)
    for r in range(b):
        for i in range(1, t):
            new = seg[r, i] != seg[r, i - 1]
            doc[r, i] = doc[r, i - 1] + new
            pos[r, i] = 0 if new else pos[r, i - 1] + 1
    return doc, pos


def _rope(x, pos):
    half = x.shape[-1] // 2
    freq = THETA ** (-np.arange(half) * 2.0 / x.shape[-1])
    ang = jnp.asarray(pos[..., None, None] * freq)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)


def _qkv(p, x):
    b, t, _ = x.shape
    q = (x @ p["wq"]["kernel"]).reshape(b, t, H, D)
    k, v = ((x @ p[n]["kernel"]).reshape(b, t, HKV, D) for n in ("wk", "wv"))
    return q, jnp.repeat(k, H // HKV, axis=2), jnp.repeat(v, H // HKV, axis=2)


def _masks(seg):
    """``local, memory: [B, T, T]`` bool from the documented rule, token by token."""
    doc, pos = _docs(seg)
    b, t = seg.shape
    local, memory = np.zeros((b, t, t), bool), np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            start = L * (pos[r, i] // L)
            for j in range(t):
                same = doc[r, j] == doc[r, i]
                local[r, i, j] = same and start <= pos[r, j] <= pos[r, i] and j <= i
                memory[r, i, j] = same and start - M <= pos[r, j] < start
    return local, memory, pos


def _select(p, x, memory):
    """The top-k of each (token, head) among its memory candidates, by NumPy argsort."""
    q, k, _ = (np.asarray(a) for a in _qkv(p, x))
    tau = np.exp(np.asarray(p["log_temperature"]))
    s = tau[None, None, :, None] * np.einsum("bihd,bjhd->bihj", _unit(q), _unit(k))
    sel = np.zeros(s.shape, bool)
    for r, i, h in np.ndindex(*s.shape[:3]):
        cand = [j for j in np.argsort(-s[r, i, h], kind="stable") if memory[r, i, j]][:TOPK]
        sel[r, i, h, cand] = True
    return sel


def reference(p, x, local, pos, sel):
    b, t, _ = x.shape
    q, k, v = _qkv(p, x)
    lg = jnp.einsum("bihd,bjhd->bhij", _rope(q, pos), _rope(k, pos)) * D ** -0.5
    lm = jnp.asarray(local)[:, None]
    w = jnp.where(lm, jnp.exp(lg - jnp.max(jnp.where(lm, lg, -jnp.inf), -1, keepdims=True)), 0.0)
    a_loc = jnp.einsum("bhij,bjhd->bihd", w / w.sum(-1, keepdims=True), v)
    unit = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + EPS)
    # the memory is non-differentiable: its keys and values are constants
    km, vm = jax.lax.stop_gradient(unit(k)), jax.lax.stop_gradient(v)
    s = jnp.exp(p["log_temperature"])[None, None, :, None] * jnp.einsum("bihd,bjhd->bihj", unit(q), km)
    sm = jnp.asarray(sel)
    any_sel = sm.any(-1, keepdims=True)
    top = jnp.where(any_sel, jnp.max(jnp.where(sm, s, -jnp.inf), -1, keepdims=True), 0.0)  # finite everywhere
    e = jnp.where(sm, jnp.exp(s - top), 0.0)
    w = jnp.where(any_sel, e / jnp.where(any_sel, e.sum(-1, keepdims=True), 1.0), 0.0)
    a_mem = jnp.einsum("bihj,bjhd->bihd", w, vm)
    g = jax.nn.sigmoid(p["gate_bias"])[:, None]
    return (g * a_mem + (1 - g) * a_loc).reshape(b, t, H * D) @ p["wo"]["kernel"]


def _inputs(seed=4, t=23):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, t, 16)))
    seg = np.stack([np.full(t, 7), np.where(np.arange(t) < 13, 3, 5)])  # row 1: documents of 13 and 10 tokens
    return x, seg


def test_block_equals_documented_semantics_forward_and_gradients(x64):
    blk = _block()
    graphdef, params = nnx.split(blk)
    pd = params.to_pure_dict()
    x, seg = _inputs()
    local, memory, pos = _masks(seg)
    sel = _select(pd, x, memory)
    read = sel.any(-1)  # [B, T, H]: the first segment of each document reads nothing, the others something
    assert not read[0, :4].any() and read[0, 4:].all() and not read[1, 13:17].any() and read[1, 17:].all()
    co = np.random.default_rng(5).normal(size=(2, 23, 16))
    first = pos < L  # the first segment of each document: the loss leaves it out, so
    co = jnp.asarray(np.where(first[..., None], 0.0, co))  # its tokens reach the loss only through the memory

    def ours(pd, x):
        y = nnx.merge(graphdef, nnx.State(pd))(x, segment_ids=jnp.asarray(seg, jnp.int32))
        return jnp.sum(y * co), y

    def ref(pd, x):
        y = reference(pd, x, local, pos, sel)
        return jnp.sum(y * co), y

    run = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))
    (_, y), (g_ours_p, g_ours_x) = run(pd, x)
    (_, y_ref), (g_ref_p, g_ref_x) = jax.jit(jax.value_and_grad(ref, (0, 1), has_aux=True))(pd, x)
    assert rel_err(y, y_ref) < ROPE_TOL
    assert rel_err(g_ours_x, g_ref_x) < ROPE_TOL
    ref_leaves = dict(jax.tree_util.tree_leaves_with_path(g_ref_p))
    for path, a in jax.tree_util.tree_leaves_with_path(g_ours_p):
        b = ref_leaves[path]
        assert float(jnp.abs(b).max()) > 0 and rel_err(a, b) < ROPE_TOL, jax.tree_util.keystr(path)
    # no gradient through the memory: the first segments' tokens get none, the others some ...
    assert float(jnp.abs(g_ours_x[first]).max()) == 0.0 and float(jnp.abs(g_ours_x[~first]).min()) > 0.0
    # ... yet the forward reads them from the memory
    (_, moved), _ = run(pd, jnp.where(jnp.asarray(first)[..., None], -x, x))
    assert float(jnp.abs(moved - y)[~first].max()) > 1e-3
    # the second document of the packed row equals it run alone (the first cannot leak into it)
    alone = nnx.jit(lambda m, x: m(x))(blk, x[1:, 13:])
    assert rel_err(y[1:, 13:], alone) < TOL64


def test_decoding_and_pieces_equal_the_forward(x64):
    blk = _block()
    x, _ = _inputs()
    y = nnx.jit(lambda m, x: m(x))(blk, x)
    run = nnx.jit(lambda m, x, c: m(x, cache=c))
    cache = blk.init_cache(2, 23)
    outs = []
    for a, b in ((0, 11), (11, 22), (22, 23)):  # the second piece starts mid-segment and spans several
        o, cache = run(blk, x[:, a:b], cache)
        outs.append(o)
    assert rel_err(jnp.concatenate(outs, 1), y) < TOL64
    # the ring holds the newest M pairs of the completed segments (positions 14..19 of 0..19)
    assert isinstance(cache, EpisodicCache) and int(cache.window.pos) == 23
    assert sorted(np.asarray(cache.memory.positions[0]).tolist()) == list(range(14, 20))
    assert np.asarray(cache.memory.count).tolist() == [20, 20]
    cache = blk.init_cache(2, 23)
    outs = []
    for t in range(23):  # token by token: each segment written when its last token is seen
        o, cache = run(blk, x[:, t:t + 1], cache)
        outs.append(o)
        assert int(cache.memory.count[0]) == L * ((t + 1) // L)
    assert rel_err(jnp.concatenate(outs, 1), y) < TOL64


def test_block_is_registered():
    assert get_block("EP") is EpisodicAttention and get_block("episodic") is EpisodicAttention


@pytest.mark.slow  # (a further compile; the bf16 error bound of the read is in the default run)
def test_block_keeps_bf16():
    blk = _block(jnp.bfloat16)
    x, _ = _inputs()
    y = nnx.jit(lambda m, x: m(x))(blk, x.astype(jnp.bfloat16))
    y32 = nnx.jit(lambda m, x: m(x))(_block(jnp.float32), x.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
    assert rel_rmse(y, y32) < 5e-2
    assert isinstance(blk.init_cache(2, 8).memory, EpisodicState)


# ----------------------------------------------------------------------------- the recall benchmark


def test_bench_local_documents_restate_and_ask_in_the_last_segment():
    """``make_docs(local_fraction=1)``: the last segment restates r = L // 4 facts in its first half
    and asks them (targets = the values stated earlier) in its second half; 0: only the far ask."""
    kw = dict(segment_length=16, filler_segments=2, facts=6, n_keys=32, n_values=16, n_filler=16)
    tok, tgt, w = bench_episodic.make_docs(np.random.default_rng(0), 3, **kw, local_fraction=1.0)
    q0, r = 16 * 3, 4
    for b in range(3):
        stated = dict(zip(tok[b, 0:12:2], tok[b, 1:12:2]))  # segment 0: the 6 facts
        restated = dict(zip(tok[b, q0:q0 + 2 * r:2], tok[b, q0 + 1:q0 + 2 * r:2]))
        asked = np.flatnonzero(w[b])
        assert len(asked) == r and asked.min() >= q0 + 8 and sorted(restated) == sorted(tok[b, asked])
        assert all(stated[k] == restated[k] == tgt[b, i] for k, i in zip(tok[b, asked], asked))
    _, _, w_far = bench_episodic.make_docs(np.random.default_rng(0), 3, **kw)
    assert (w_far.sum(1) == 6).all() and np.flatnonzero(w_far[0]).min() == q0


@pytest.mark.slow
def test_bench_episodic_learned_smoke(tmp_path):
    """``python -m benchmarks.bench_episodic --learned --local-fraction 0.5`` at toy size."""
    out = tmp_path / "episodic.json"
    bench_episodic.main(["--learned", "--local-fraction", "0.5", "--steps", "2", "--batch", "2", "--d-embed", "8",
                         "--filler-segments", "1", "--eval-batches", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["learned_qk"] for r in rows] == [True, True]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["local_accuracy"] <= 1.0 for r in rows)
