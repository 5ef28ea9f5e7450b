"""The fast way of the chunked channel-wise delta rule (GDN-2, and KDA through
:func:`memjax.memory.gdn2.channel_delta`) for tame gates, and its lean XLA chunk-to-chunk pass.

:func:`tame_chunked`: the chunked form of :mod:`memjax.memory.gdn2` (equations there) when, per
chunk and key channel, the total decay ``sum |g|`` stays within ``TAME_SPAN * log(float max)``
(about 44 in float32; :func:`memjax.memory.gdn2._is_tame` checks it at run time and otherwise
takes the general way). Then every cumulative log decay ``|G| <= 44``, and the per-channel
decayed scores factor through the chunk start as the reference point (as
:mod:`memjax.memory.linear`'s tame GLA route does)::

    P_ij = sum_c q_ic k_jc exp(G_ic - G_jc) = sum_c [q_ic exp(G_ic)] [k_jc exp(-G_jc)]   (j <= i)
    L_ij = sum_c a_ic k_jc exp(G_ic - G_jc) = sum_c [a_ic exp(G_ic)] [k_jc exp(-G_jc)]   (j < i)

two plain matmuls per chunk sharing the key factor ``k exp(-G)``, with every factor a normal
float and every product finite (up to ``exp(44) |q| |k|`` for the pairs ``j > i``, which are
selected away after the product and so never reach a kept entry or a gradient). The only resets
are segment starts (a tame gate has ``exp(g) > 0``), shared by all channels, so the cumulative
sums are one ``[C, C]`` matmul per chunk (:func:`memjax.memory.chunking.uniform_channel_decays`)
and the masks are per position, not per channel. The reference is causal: a query's factor
depends on no later gate. ``A_gamma = exp(G) a`` (the UT transform's right-hand side) is the
erase factor itself, and ``exp(G_{C-1} - G_j) k_j = exp(G_{C-1}) [k_j exp(-G_j)]`` the key factor
times the chunk's decay.

:func:`lean_chunk_recurrence`: the same recurrence as :func:`memjax.kernels.chunk_pass.chunk_recurrence` with the UT transform's
``w`` and per-key-channel (or scalar) chunk decays ``a``; per batch and head, ``S_0 = s0``::

    delta_n = u_n - w_n S_n
    o_n     = qg_n S_n + p_n delta_n
    S_{n+1} = diag(a_n) S_n + ke_n^T delta_n

with its own reverse pass (``jax.custom_vjp``): autodiff of the ``lax.scan`` does every
per-chunk product of the backward pass inside the loop, one chunk at a time; here the reverse
loop carries only the state's cotangent ``dS`` (two matmuls per chunk, the sequential part)::

    d delta_n = p_n^T do_n + ke_n dS_{n+1}
    dS_n      = diag(a_n) dS_{n+1} + qg_n^T do_n - w_n^T d delta_n

and every other gradient is one batched product over all chunks afterwards (the structure of
the Pallas kernels' ``custom_vjp`` in :mod:`memjax.kernels.chunk_pass`)::

    d qg_n = do_n S_n^T     d p_n = do_n delta_n^T     d ke_n = delta_n dS_{n+1}^T
    d w_n  = -d delta_n S_n^T     d u_n = d delta_n     d a_n = sum_v dS_{n+1} * S_n

Dtypes as in :mod:`memjax.kernels.chunk_pass`: the chunk tensors keep their dtype, every matmul
accumulates in the state's dtype (float32, or float64), and the state (or ``delta``) is rounded
to a 16-bit chunk tensor's dtype only as that matmul's operand (:func:`as_operand`). The forward
saves ``S_n`` and ``delta_n`` per chunk (what the scan's autodiff saves as well).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import as_operand, chunk_recurrence, runs_xla
from memjax.kernels.manual_axes import common_varying
from memjax.memory.chunking import uniform_channel_decays
from memjax.memory.ut_transform import unit_lower_inverse


def tame_chunked(qc, kc, uc, ac, gc, s0, seg, scale, *, impl, interpret):
    """The chunked channel-wise delta rule for tame gates (module docstring), on chunk stacks:
    ``qc, kc, ac: [B, H, N, C, K]`` (q, k in the operand dtype, the erase vectors ``a`` in the
    accumulation dtype), ``uc: [B, H, N, C, V]`` (write values), ``gc: [B, H, N, C, Kg]`` log decays
    (``Kg = K`` or 1), ``s0: [B, H, K, V]`` (its dtype is the accumulation dtype), ``seg``: chunked
    segment resets ``[B, N, C]`` or None. Returns ``(o [B, H, N, C, V]`` in q's dtype, ``S_N``)."""
    acc, md = s0.dtype, qc.dtype
    c = qc.shape[3]
    G, r, _, _ = uniform_channel_decays(gc, seg, acc)  # r: [B or 1, 1, N or 1, C, 1]
    up, down = jnp.exp(G), jnp.exp(-G)  # |G| <= 44 (float32): normal floats
    kf = kc * down
    kfm = kf.astype(md)
    qf, af = qc * up, ac * up
    causal = jnp.tril(jnp.ones((c, c), bool))
    if seg is None:  # (static: no masks beyond causality)
        same, live, last = True, None, None
    else:
        same = r[..., :, None, 0] == r[..., None, :, 0]  # no segment start in (j, i]
        live = r == 0  # no segment start in [0, i]: the incoming state reaches i
        last = r == r[..., -1:, :]  # no segment start in (j, C - 1]: j's write reaches the chunk end
    keep = lambda m, x: x if m is None else jnp.where(m, x, 0.0)
    scores = lambda x: jnp.einsum("bhnik,bhnjk->bhnij", x.astype(md), kfm, preferred_element_type=acc)
    p = jnp.where(causal & same, scores(qf), 0.0) * scale
    lower = jnp.where(jnp.tril(causal, -1) & same, scores(af), 0.0)
    qg = keep(live, qf) * scale
    aw = keep(live, af)
    # exp(G_{C-1} - G_j) k_j with the exponent as a suffix sum of g (one [C, C] matmul; in the
    # last segment no reset lies in (j, C - 1], elsewhere it is masked): the decay to the chunk end
    # as exp(G_{C-1}) times the key factor would broadcast G_{C-1} over the chunk, and the
    # backward pass's sum over it runs as a reduction that XLA:CPU does slowly (measured ~10% of
    # the forward + backward time at T = 4096, C = K = 64).
    after = jnp.triu(jnp.ones((c, c), acc), 1)
    ke = keep(last, kc * jnp.exp(jnp.einsum("ij,bhnjk->bhnik", after, gc.astype(acc))))
    decay = keep(None if seg is None else r[..., -1, :] == 0, up[..., -1, :])  # [B, H, N, Kg]
    decay = decay[..., 0] if decay.shape[-1] == 1 else decay  # a scalar per chunk for per-head gates
    # UT transform: U = (I + L)^{-1} u, W = (I + L)^{-1} A_gamma (L and its inverse in `acc`, the
    # matmul operands in the input dtype, as the general way and flash-linear-attention do).
    inv = unit_lower_inverse(lower).astype(md)
    ut = lambda x: jnp.einsum("bhnij,bhnjx->bhnix", inv, x.astype(md), preferred_element_type=acc).astype(md)
    u, w = ut(uc), ut(aw)
    b, h, n, _, k = qc.shape
    if runs_xla(impl, (b, h, n, c, k, uc.shape[-1]), md, interpret, vector_decay=decay.ndim == 4):
        return lean_chunk_recurrence(qg.astype(md), p.astype(md), u, w, ke.astype(md), decay, s0)
    return chunk_recurrence(qg.astype(md), p.astype(md), u, ke.astype(md), decay, s0, w=w, impl=impl,
                            interpret=interpret)


def lean_chunk_recurrence(qg, p, u, w, ke, a, s0):
    """``(o [B, H, N, C, V]`` in u's dtype, ``S_N [B, H, K, V]`` in s0's dtype) of the recurrence in
    the module docstring. ``qg, w, ke: [B, H, N, C, K]``, ``p: [B, H, N, C, C]``,
    ``u: [B, H, N, C, V]``, ``a: [B, H, N]`` or ``[B, H, N, K]``, ``s0: [B, H, K, V]``; shapes are
    the caller's (validated ones: the chunked GDN-2 / KDA form)."""
    # Inside shard_map a replicated s0 must vary like the chunk tensors to be a loop carry.
    (s0, *_), _ = common_varying(s0, qg, p, u, w, ke, a)
    return _lean(qg, p, u, w, ke, a, s0)


def _decay(a_n, acc):
    """A chunk's decay as a factor of the ``[B, H, K, V]`` state: ``[B, H, 1, 1]`` or ``[B, H, K, 1]``."""
    return (a_n[..., None, None] if a_n.ndim == 2 else a_n[..., :, None]).astype(acc)


def _chunk_major(x):
    return jnp.moveaxis(x, 2, 0)


def _forward(qg, p, u, w, ke, a, s0):
    acc = s0.dtype

    def step(s, inp):
        u_n, w_n, k_n, a_n = inp
        delta = u_n.astype(acc) - jnp.einsum("bhck,bhkv->bhcv", w_n, as_operand(s, w_n), preferred_element_type=acc)
        s_next = _decay(a_n, acc) * s + jnp.einsum("bhck,bhcv->bhkv", k_n, as_operand(delta, k_n),
                                                   preferred_element_type=acc)
        return s_next, (s, delta)

    s, (s_in, delta) = jax.lax.scan(step, s0, tuple(_chunk_major(x) for x in (u, w, ke, a)))
    s_in, delta = jnp.moveaxis(s_in, 0, 2), jnp.moveaxis(delta, 0, 2)  # [B, H, N, K, V], [B, H, N, C, V]
    o = (jnp.einsum("bhnck,bhnkv->bhncv", qg, as_operand(s_in, qg), preferred_element_type=acc)
         + jnp.einsum("bhnij,bhnjv->bhniv", p, as_operand(delta, p), preferred_element_type=acc))
    return (o.astype(u.dtype), s), (s_in, delta)


@jax.custom_vjp
def _lean(qg, p, u, w, ke, a, s0):
    return _forward(qg, p, u, w, ke, a, s0)[0]


def _lean_fwd(qg, p, u, w, ke, a, s0):
    out, (s_in, delta) = _forward(qg, p, u, w, ke, a, s0)
    return out, (qg, p, u, w, ke, a, s_in, delta)


def _lean_bwd(res, cts):
    qg, p, u, w, ke, a, s_in, delta = res
    do, dsf = cts
    acc = s_in.dtype
    do = do.astype(acc)
    # The parts of d delta_n and dS_n that come from chunk n's own outputs: batched over chunks.
    dd_out = jnp.einsum("bhnij,bhniv->bhnjv", p, as_operand(do, p), preferred_element_type=acc)
    ds_out = jnp.einsum("bhnck,bhncv->bhnkv", qg, as_operand(do, qg), preferred_element_type=acc)

    def step(ds, inp):  # ds: the cotangent of S_{n+1}
        dd_n, dso_n, w_n, k_n, a_n = inp
        dd = dd_n + jnp.einsum("bhck,bhkv->bhcv", k_n, as_operand(ds, k_n), preferred_element_type=acc)
        ds_prev = (_decay(a_n, acc) * ds + dso_n
                   - jnp.einsum("bhck,bhcv->bhkv", w_n, as_operand(dd, w_n), preferred_element_type=acc))
        return ds_prev, (dd, ds)

    ds0, (dd, dsn) = jax.lax.scan(step, dsf.astype(acc), tuple(_chunk_major(x) for x in (dd_out, ds_out, w, ke, a)),
                                  reverse=True)
    dd, dsn = jnp.moveaxis(dd, 0, 2), jnp.moveaxis(dsn, 0, 2)  # [B, H, N, C, V], [B, H, N, K, V]
    d_qg = jnp.einsum("bhncv,bhnkv->bhnck", do, s_in)
    d_p = jnp.einsum("bhniv,bhnjv->bhnij", do, delta)
    d_ke = jnp.einsum("bhncv,bhnkv->bhnck", delta, dsn)
    d_w = -jnp.einsum("bhncv,bhnkv->bhnck", dd, s_in)
    # d a_n = <dS_{n+1}, S_n> over the whole state (scalar decay) or over V (per key channel)
    d_a = jnp.einsum("bhnkv,bhnkv->bhn" if a.ndim == 3 else "bhnkv,bhnkv->bhnk", dsn, s_in)
    return (d_qg.astype(qg.dtype), d_p.astype(p.dtype), dd.astype(u.dtype), d_w.astype(w.dtype),
            d_ke.astype(ke.dtype), d_a.astype(a.dtype), ds0)


_lean.defvjp(_lean_fwd, _lean_bwd)
