"""Mixture-of-memories against a naive per-token loop over memories written from the MoM equations.

Tolerances: float64 rtol = atol = 1e-10 (outputs, final states, gradients); bf16 vs float32
relative RMSE < 2e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.mixture import mixture_of_memories
from tests.helpers import rel_rmse

TOL = dict(rtol=1e-10, atol=1e-10)
jmom = jax.jit(mixture_of_memories, static_argnames=("top_k", "memory", "shared_memory", "mode", "chunk_size"))


def reference(q, k, v, router_logits, *, top_k, beta=None, g=None, memory, shared_memory, state,
              segment_ids=None):
    """Token loop (``lax.scan``); every memory updated explicitly, unselected ones left as they are."""
    b, t, h, dk = q.shape
    m = router_logits.shape[-1]
    mp = k.shape[2]
    logits = router_logits if router_logits.ndim == 4 else jnp.broadcast_to(
        router_logits[:, :, None], (b, t, h, m))
    order = jnp.argsort(-logits, axis=-1, stable=True)[..., :top_k]  # [B, T, H, k]
    onehot = jax.nn.one_hot(order, m, dtype=bool)  # [B, T, H, k, M]
    sel = onehot.any(-2)
    top = jnp.take_along_axis(logits, order, -1)
    w = jnp.exp(top - top.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    weight = jnp.sum(w[..., None] * onehot, -2)  # [B, T, H, M]
    if shared_memory:
        sel = jnp.concatenate([sel, jnp.ones_like(sel[..., :1])], -1)
        weight = jnp.concatenate([weight, jnp.ones_like(weight[..., :1])], -1)
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    reset = np.concatenate([np.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    beta = jnp.zeros((b, t, mp, h)) if beta is None else beta
    g = jnp.zeros((b, t, mp, h)) if g is None else g
    scale = dk ** -0.5

    def step(s, inp):  # s: [B, M', H, K, V]
        qt, kt, vt, bt, gt, st, wt, rt = inp
        s = jnp.where(rt[:, None, None, None, None], 0.0, s)
        new = jnp.exp(gt)[..., None, None] * s
        if memory == "linear":
            new = new + kt[..., :, None] * vt[..., None, :]
        else:
            err = vt - jnp.einsum("bmhkv,bmhk->bmhv", new, kt)
            new = new + kt[..., :, None] * (bt[..., None] * err)[..., None, :]
        s = jnp.where(jnp.swapaxes(st, 1, 2)[..., None, None], new, s)
        reads = jnp.einsum("bmhkv,bhk->bmhv", s, qt) * scale
        return s, jnp.einsum("bhm,bmhv->bhv", wt, reads)

    tm = lambda x: jnp.swapaxes(jnp.asarray(x), 0, 1)
    s, o = jax.lax.scan(step, state, tuple(map(tm, (q, k, v, beta, g, sel, weight, reset))))
    return jnp.swapaxes(o, 0, 1), s


def make_inputs(seed, *, b=2, t=11, h=2, m=4, shared=True, dk=3, dv=4, per_head=False, memory="delta",
                dtype=np.float64):
    rng = np.random.default_rng(seed)
    mp = m + shared
    f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
    k = f(b, t, mp, h, dk)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(q=f(b, t, h, dk), k=k, v=f(b, t, mp, h, dv),
             router_logits=f(b, t, h, m) if per_head else f(b, t, m),
             g=jnp.asarray(-rng.uniform(0.0, 0.5, (b, t, mp, h)), dtype))
    if memory == "delta":
        x["beta"] = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, mp, h)), dtype)
    state = f(b, mp, h, dk, dv)
    return x, state


def _assert_tree_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


@pytest.mark.parametrize("memory,per_head,shared", [("delta", False, True), ("linear", True, False)])
def test_chunked_matches_reference_with_gradients(x64, memory, per_head, shared):
    x, state = make_inputs(0, memory=memory, per_head=per_head, shared=shared)
    opts = dict(top_k=2, memory=memory, shared_memory=shared)

    def impl(x, state):
        return mixture_of_memories(**x, **opts, initial_state=state, mode="chunked", chunk_size=4)

    def ref(x, state):
        return reference(**x, **opts, state=state)

    def outputs_and_grads(run):
        """Outputs and gradients of a random-cotangent loss (through output and final state) in
        one compiled function."""

        @jax.jit
        def f(x, state):
            out, vjp = jax.vjp(run, x, state)
            rng = np.random.default_rng(1)
            return out, vjp(tuple(jnp.asarray(rng.normal(size=o.shape)) for o in out))

        return f(x, state)

    out1, g1 = outputs_and_grads(impl)
    out2, g2 = outputs_and_grads(ref)
    _assert_tree_close(out1, out2)
    _assert_tree_close(g1, g2)
    assert all(float(jnp.abs(z).max()) > 0 for z in jax.tree.leaves(g1))


def test_recurrent_equals_chunked_and_packed_equals_separate(x64):
    """recurrent == chunked; a packed row (chunked) equals its documents run separately, each
    from a zero state, and the reference loop with resets."""
    x, _ = make_inputs(2, t=13)
    opts = dict(top_k=1, memory="delta")
    _assert_tree_close(jmom(**x, **opts, mode="recurrent"), jmom(**x, **opts, chunk_size=4))

    lens = [[4, 6, 3], [7, 6]]
    seg = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(row)), []) for row in lens])
    docs, where = [], []
    for r, row in enumerate(lens):
        start = 0
        for n in row:
            docs.append({name: jnp.pad(a[r, start:start + n], [(0, 13 - n)] + [(0, 0)] * (a.ndim - 2))
                         for name, a in x.items()})
            where.append((r, start, n))
            start += n
    docs = {name: jnp.stack([d[name] for d in docs]) for name in x}
    o, s = jmom(**x, **opts, segment_ids=seg, chunk_size=4)
    o_docs, _ = jmom(**docs, **opts, chunk_size=4)
    for i, (r, start, n) in enumerate(where):
        np.testing.assert_allclose(o[r, start:start + n], o_docs[i, :n], **TOL)
    _assert_tree_close((o, s), jax.jit(lambda x: reference(**x, **opts, shared_memory=True, segment_ids=seg,
                                                           state=jnp.zeros_like(s)))(x))


def test_initial_state_chaining(x64):
    x, state = make_inputs(3, t=12)
    opts = dict(top_k=2, memory="delta", chunk_size=4)
    o, s = jmom(**x, **opts, initial_state=state)
    o1, s1 = jmom(**{n: a[:, :5] for n, a in x.items()}, **opts, initial_state=state)
    o2, s2 = jmom(**{n: a[:, 5:] for n, a in x.items()}, **opts, initial_state=s1)
    _assert_tree_close((o, s), (jnp.concatenate([o1, o2], 1), s2))


def test_unselected_memory_is_untouched(x64):
    """A memory the router never picks keeps its initial state exactly, however strong the
    decay on its (ignored) inputs; the selected ones change."""
    x, state = make_inputs(4, t=9, memory="linear", shared=False)
    x["router_logits"] = x["router_logits"].at[..., 1].set(-1e9)
    x["g"] = x["g"].at[:, :, 1].set(-5.0)
    _, s = jmom(**x, top_k=2, shared_memory=False, initial_state=state, chunk_size=4)
    np.testing.assert_array_equal(s[:, 1], state[:, 1])
    assert float(jnp.abs(s[:, 0] - state[:, 0]).max()) > 1e-3


@pytest.mark.slow
def test_bf16_close_to_float32():
    x, state = make_inputs(5, t=40, dk=16, dv=16, dtype=np.float32)
    o32, s32 = jmom(**x, top_k=2, memory="delta", initial_state=state, chunk_size=16)
    xb = {n: a.astype(jnp.bfloat16) for n, a in x.items()}
    ob, sb = jmom(**xb, top_k=2, memory="delta", initial_state=state, chunk_size=16)
    assert ob.dtype == jnp.bfloat16 and sb.dtype == jnp.float32
    assert rel_rmse(ob, o32) < 2e-2 and rel_rmse(sb, s32) < 2e-2


def test_input_validation():
    x, state = make_inputs(6, t=5, dtype=np.float32)
    call = lambda **kw: mixture_of_memories(**{**x, **kw}, top_k=2, memory="delta")
    with pytest.raises(ValueError, match="q must have shape"):
        call(q=x["q"][0])
    with pytest.raises(ValueError, match="router_logits must have shape"):
        call(router_logits=x["router_logits"][:, :3])
    with pytest.raises(ValueError, match="top_k"):
        mixture_of_memories(**x, top_k=5, memory="delta")
    with pytest.raises(ValueError, match="k must have shape"):
        call(k=x["k"][:, :, :4])
    with pytest.raises(ValueError, match="v must have shape"):
        call(v=x["v"][:, :, :4])
    with pytest.raises(ValueError, match="beta must have shape"):
        call(beta=x["beta"][..., 0])
    with pytest.raises(ValueError, match="needs beta"):
        call(beta=None)
    with pytest.raises(ValueError, match="only used by memory='delta'"):
        mixture_of_memories(**x, top_k=2, memory="linear")
    with pytest.raises(ValueError, match="memory must be"):
        mixture_of_memories(**x, top_k=2, memory="softmax")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        call(initial_state=state[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        mixture_of_memories(**x, top_k=2, memory="delta", chunk_size=0)
    with pytest.raises(ValueError, match="mixture_of_memories: mode must be one of"):
        mixture_of_memories(**x, top_k=2, memory="delta", mode="parallel")
    with pytest.raises(TypeError, match="mixture_of_memories: k must have a floating dtype .*got int32"):
        call(k=x["k"].astype(jnp.int32))

