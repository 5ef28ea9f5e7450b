"""Titans MAC block: memory as context (Behrouz et al. 2025, section 4.1).

``titans_mac`` (memory as context, alias ``MAC``; paper section 4.1): segments of ``segment``
tokens; each segment retrieves ``h = M_{s-1}(q(x))`` from the memory as it stood at the segment
start, attends over ``[persistent tokens || h || x_segment]`` (causal: token ``i`` sees all
persistent tokens and ``h_j, x_j`` for ``j <= i`` of its segment), then writes the memory with
the attention output ``y`` (one chunk of the chunked form per segment, ``chunk_size = segment``)
and gates the attention output with the memory's read at ``y``::

    a = Attn(x; P, h, x) ;  y = a W_y ;  M_s = write(M_{s-1}; y) ;  out = W_o(a * sigmoid(RMSNorm(M_s(q(y)))))

(``M_s`` read per token, written only with ``y_j, j <= i``; see :class:`TitansMAC` for the exact
masking and packing rules). Decoding: ``y, cache = block(x, cache=cache)`` with
:class:`TitansMACCache` (see the class). Built on :class:`memjax.nn.titans.NeuralMemory`'s public
methods (project, query, update, retrieve, initial_state).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import rope
from memjax.memory.neural_memory import TitansCache
from memjax.memory.segments import document_ids, positions_in_segment
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.titans import MemoryInputs, NeuralMemory, SlidingWindowAttention, check_memory_options
from memjax.nn.validate import check_heads, check_no_segments, check_nonnegative, check_positive

_NO_GROUP = -(2 ** 30)  # group id of empty key slots: equal to no query's group


def _window(x, start, n):
    """Per-row time window ``x[b, start[b] : start[b] + n]`` of ``x [B, L, ...]``."""
    idx = start[:, None] + jnp.arange(n)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _where_state(pred, a, b):
    """Per batch row ``pred [B]``: TitansState ``a`` where true, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


_KEYS = ("kx", "vx", "kh", "vh")  # attention keys / values of segment tokens and retrieved tokens (cache order)
_MEM = ("mk", "mv", "theta", "eta", "alpha")  # memory writes derived from the attention output y


class TitansMACCache(NamedTuple):
    """Decoding cache of :class:`TitansMAC`.

    ``conv``: the retrieval query's short-conv window ``[B, conv_width - 1, H K]`` (``None``
    without conv); ``memory``: :class:`memjax.memory.neural_memory.TitansCache` (the memory at the
    start of the current segment and the memory writes of its tokens so far, ``memory.count`` of
    them); ``kx, vx, kh, vh: [B, segment, H, K]``: attention keys/values of the current segment's
    tokens and retrieved tokens (first ``memory.count`` slots valid); ``pos``: tokens seen.
    """

    conv: jax.Array | None
    memory: TitansCache
    kx: jax.Array
    vx: jax.Array
    kh: jax.Array
    vh: jax.Array
    pos: jax.Array


@register_block("titans_mac", aliases=("MAC",))
class TitansMAC(Block):
    """Memory as context: segment attention over [persistent || retrieved memory || segment].

    Time is split into segments of ``segment`` tokens (document-relative: a segment starts at
    every document start and every ``segment`` tokens after it; the last one may be partial).
    With ``M_{s-1}`` the neural memory after the previous segments of the document (``params0``,
    zero momentum, at a document start) and ``P`` the ``num_persistent`` learned tokens, for the
    tokens ``x_i`` of segment ``s`` (``i`` = position in the segment)::

        h_i = W_h RMSNorm(M_{s-1}(q_i))              q_i = l2norm(SiLU(conv(x W_q)))   (retrieval)
        a_i = Attn(q = x_i;  keys/values from P, {h_j : j <= i}, {x_j : j <= i})          (per head)
        y_i = W_y a_i                                                                    (model dim)
        M_s = M_{s-1} written with (k, v) = (l2norm(SiLU(y W_k)), SiLU(y W_v)), gates from y,
              as one chunk of memjax.memory.neural_memory.titans (chunk_size = segment)
        r_i = RMSNorm(M_{s,i}(q'_i))                 q'_i = l2norm(SiLU(y_i W_q))
        out_i = W_o (a_i * sigmoid(r_i))

    Masking: every token sees all persistent tokens, and the retrieved tokens and segment tokens
    of its own segment at positions ``j <= i`` only. ``h_j`` is computed from ``x_j``, so
    letting ``i`` see ``h_j`` for ``j > i`` would leak the future; nothing crosses a segment
    (earlier segments reach a token only through ``M_{s-1}``) or a document. The persistent
    tokens are keys/values without position (their logits use the query before RoPE); the
    retrieved and segment tokens of position ``j`` are rotated at ``j``.

    Output: the paper's ``o = y ⊗ M*_s(y)`` reads the memory after the whole segment's write,
    which would let token ``i`` see tokens ``j > i`` of its segment. Here ``M_{s,i}`` is the
    chunked form's per-token state (written with ``y_j, j <= i``, every gradient taken at
    ``M_{s-1}``; ``M_{s,last} = M_s``), and ``⊗`` is the per-head product of the attention
    output with the sigmoid of the normalised read, followed by the output projection ``W_o``.
    ``W_q, W_k, W_v``, the gates and ``params0`` are those of :class:`NeuralMemory` (whose short
    conv is not used: y already mixes its segment; the retrieval query has its own conv).

    Training form: a ``lax.scan`` over blocks of ``segment`` positions. Each block reads the
    memory, attends, writes the memory with :func:`memjax.memory.neural_memory.titans` over the window
    of one segment (from the segment start carried in) and, with packed documents, a second
    window for the segments starting inside the block (a document start, or the next segment of
    a document whose segment began in the previous block; those tokens retrieve from the memory
    after the first window). With ``segment_ids`` the block is exact for packed documents (equal
    to running them one by one); without, blocks are the segments and the second pass is absent.

    Decoding: ``y, cache = block(x, cache=cache)`` for any ``T >= 1`` with :class:`TitansMACCache`
    (the memory at the start of the current segment and the memory writes of its tokens so far,
    the attention keys/values of the current segment's tokens and retrieved tokens, the short-conv
    window and the position) runs the same block scan starting mid-segment (its blocks start at
    the first new token, as packed documents do).

    Args:
      d_model: model width; ``num_heads`` heads of ``head_dim`` (``None``: ``d_model // num_heads``).
      segment: segment length = the memory's chunk size (1: per-token memory updates).
      num_persistent: learned persistent-memory tokens prepended to every segment (0: none).
      depth, memory_expansion, activation, theta_max, eta_bias, alpha_bias: of the neural memory
        (see :class:`memjax.nn.titans.NeuralMemory`).
      conv_width: causal depthwise short conv on the retrieval query; 0: none.
      rope_theta, norm_eps, dtype: RoPE base, RMSNorm epsilon, compute dtype.
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, segment: int = 16,
                 num_persistent: int = 4, depth: int = 1, memory_expansion: int = 2, activation: str = "silu",
                 conv_width: int = 4, theta_max: float = 0.0, eta_bias: float = 0.0, alpha_bias: float = -5.0,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        self.h, self.dk = check_heads("TitansMAC", d_model, num_heads, head_dim)
        check_positive("TitansMAC", segment=segment)
        check_nonnegative("TitansMAC", num_persistent=num_persistent)
        check_memory_options("TitansMAC", chunk_size=segment, depth=depth, memory_expansion=memory_expansion,
                             activation=activation, conv_width=conv_width, theta_max=theta_max)
        self.seg, self.num_persistent, self.activation = segment, num_persistent, activation
        h, dk, d, dt = self.h, self.dk, d_model, jnp.dtype(dtype)
        self.dtype = dt
        heads = dict(num_heads=num_heads, head_dim=head_dim, norm_eps=norm_eps, dtype=dtype)
        # The memory's chunk is the segment; no short conv of its own (y already mixes its
        # segment; the retrieval query has its own conv).
        self.memory = NeuralMemory(d, **heads, chunk_size=segment, depth=depth, memory_expansion=memory_expansion,
                                   activation=activation, conv_width=0, theta_max=theta_max, eta_bias=eta_bias,
                                   alpha_bias=alpha_bias, rngs=rngs)
        self.q_conv = ShortConv(h * dk, conv_width, rngs=rngs, axes=("heads",)) if conv_width > 0 else None
        # projections, RoPE, o_norm
        self.attn = SlidingWindowAttention(d, **heads, window=segment, rope_theta=rope_theta, rngs=rngs)
        self.persistent = (param(rngs, nnx.initializers.normal(1.0), (num_persistent, d),
                                 ("memory_slots", "embed")) if num_persistent else None)
        self.h_norm = RMSNorm(dk, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wh = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.wy = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    # ------------------------------------------------------------------ pieces

    def _heads(self, z):
        return z.reshape(*z.shape[:2], self.h, self.dk)

    def _features(self, x, positions, segment_ids=None, conv_cache=None):
        """Position-wise projections of the segment tokens (retrieval query with its short conv);
        with ``conv_cache`` also the conv's new window."""
        qx, new_conv = self.memory.query(x, conv=self.q_conv, segment_ids=segment_ids, cache=conv_cache)
        qa = self._heads(self.attn.wq(x))
        return {"qx": qx, "qp": qa,
                "qr": rope(qa, positions, self.attn.theta),
                "kx": rope(self._heads(self.attn.wk(x)), positions, self.attn.theta),
                "vx": self._heads(self.attn.wv(x)), "pos": positions}, new_conv

    def _attend(self, qr, qp, keys, kgroup, kidx, qgroup, qidx):
        """Softmax attention of the segment queries over the persistent tokens and the context
        keys ``keys = (k, v)`` (``[B, N, H, K]``) visible where same group and ``kidx <= qidx``.

        Not :func:`memjax.memory.attention.causal_attention`: its mask is causal / window /
        segment over one sequence, while here the persistent keys are visible to every query
        (with the unrotated query) and context keys by segment group. Same numerics (softmax
        in float32)."""
        k, v = keys
        scale = self.dk ** -0.5
        mask = (kgroup[:, None, :] == qgroup[:, :, None]) & (kidx[:, None, :] <= qidx[:, :, None])  # [B, S, N]
        logits = jnp.einsum("bthd,bshd->bhts", qr, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask[:, None], logits, -1e30)
        np_ = 0
        if self.persistent is not None:
            p = self.persistent[...].astype(self.dtype)
            kp, vp = (w(p).reshape(-1, self.h, self.dk) for w in (self.attn.wk, self.attn.wv))
            lp = jnp.einsum("bthd,shd->bhts", qp, kp, preferred_element_type=jnp.float32) * scale
            logits = jnp.concatenate([lp, logits], axis=-1)
            np_ = kp.shape[0]
        prob = jax.nn.softmax(logits, axis=-1)  # every query sees at least itself
        o = jnp.einsum("bhts,bshd->bthd", prob[..., np_:].astype(v.dtype), v)
        if np_:
            o = o + jnp.einsum("bhts,shd->bthd", prob[..., :np_].astype(vp.dtype), vp)
        return self.attn.o_norm(o)

    def _segment_pass(self, inp, h, prev):
        """Retrieved tokens -> attention -> y and the memory writes for one block."""
        b, s = h.shape[:2]
        htok = self.wh(self.h_norm(h).reshape(b, s, -1))
        kh = rope(self._heads(self.attn.wk(htok)), inp["pos"], self.attn.theta)
        vh = self._heads(self.attn.wv(htok))
        qidx = inp["b0"] + jnp.broadcast_to(jnp.arange(s), (b, s))
        ks = [kh, inp["kx"]]
        vs = [vh, inp["vx"]]
        groups = [inp["group"]] * 2
        idxs = [qidx] * 2
        if prev is not None:
            ks, vs = [prev["kh"], prev["kx"]] + ks, [prev["vh"], prev["vx"]] + vs
            groups = [prev["group"]] * 2 + groups
            idxs = [qidx - s] * 2 + idxs
        cat = lambda xs: jnp.concatenate(xs, axis=1)
        a = self._attend(inp["qr"], inp["qp"], (cat(ks), cat(vs)), cat(groups), cat(idxs), inp["group"], qidx)
        y = self.wy(a.reshape(b, s, -1))
        m, _ = self.memory.project(y)
        return {"a": a, "kh": kh, "vh": vh, "kx": inp["kx"], "vx": inp["vx"], "mq": m.q, "mk": m.k, "mv": m.v,
                "theta": m.theta, "eta": m.eta, "alpha": m.alpha}

    def _scan(self, feats, state0, prev0, *, general, collect=False):
        """Blocks of ``segment`` positions over ``feats`` (``[B, L, ...]``, ``L`` a multiple).

        ``general``: groups (segments) need not start at block starts and documents may start
        anywhere (packed input, prefill); ``prev0`` then holds the previous block's keys and
        memory writes, ``state0`` is the memory at the start of the first block's group.
        Returns the attention outputs ``a`` and memory reads ``o`` (``[B, L, H, K]``) and, with
        ``collect``, per block the memory states and everything a decoding cache needs.
        """
        s = self.seg
        b, length = feats["qx"].shape[:2]
        nb = length // s
        mem = self.memory
        fresh = mem.initial_state(b)
        j = jnp.arange(s)
        blk = lambda x: jnp.moveaxis(x.reshape(b, nb, s, *x.shape[2:]), 1, 0)
        xs = {n: blk(x) for n, x in feats.items()}
        xs["b0"] = jnp.arange(nb, dtype=jnp.int32) * s

        def aligned(carry, inp):
            st_g, _ = carry
            cur = self._segment_pass(inp, mem.retrieve(inp["qx"], st_g.weights), None)
            o, st2 = mem.update(MemoryInputs(*(cur[n] for n in ("mq",) + _MEM)), initial_state=st_g)
            return (st2, None), {"a": cur["a"], "o": o}

        def body(carry, inp):
            st_g, prev = carry
            doc, group = inp["doc"], inp["group"]
            g, doc_g = group[:, 0], doc[:, 0]
            st_g = _where_state(doc_g == prev["doc"][:, -1], st_g, fresh)  # a document starts here
            in_doc = doc == doc_g[:, None]
            h0 = mem.retrieve(inp["qx"], st_g.weights)
            h = jnp.where(in_doc[..., None, None], h0, mem.retrieve(inp["qx"]))
            cur = self._segment_pass(inp, h, prev)
            # Window 1: the group carried in, from its start g (possibly in the previous block).
            off2 = g - (inp["b0"] - s)  # in [1, s]
            cat = lambda n: jnp.concatenate([prev[n], cur[n] if n in cur else inp[n]], axis=1)
            win = lambda n: _window(cat(n), off2, s)
            q2 = _window(jnp.concatenate([jnp.zeros_like(cur["mq"]), cur["mq"]], axis=1), off2, s)
            o2, st2 = mem.update(MemoryInputs(q2, *(win(n) for n in _MEM)), initial_state=st_g,
                                 segment_ids=win("doc"))
            o_first = _window(jnp.concatenate([o2, o2], axis=1), s - off2, s)  # valid where j < off2
            first = j[None] < off2[:, None]

            def second(cur):
                # Tokens at or after g + s: the next group of the carried document retrieves from
                # the memory after window 1; then window 2 from the group start g4 of position g + s.
                h1 = jnp.where((in_doc & ~first)[..., None, None], mem.retrieve(inp["qx"], st2.weights), h)
                cur = self._segment_pass(inp, h1, prev)
                j4 = jnp.minimum(off2, s - 1)[:, None]
                cont = jnp.take_along_axis(doc, j4, 1)[:, 0] == doc_g
                g4 = jnp.clip(jnp.take_along_axis(group, j4, 1)[:, 0] - inp["b0"], 0, s - 1)
                pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
                win4 = lambda x: _window(pad(x), g4, s)
                doc4 = _window(jnp.concatenate([doc, jnp.full_like(doc, -1)], axis=1), g4, s)
                o4, _ = mem.update(MemoryInputs(*(win4(cur[n]) for n in ("mq",) + _MEM)),
                                   initial_state=_where_state(cont, st2, fresh), segment_ids=doc4)
                o_second = jnp.take_along_axis(o4, jnp.clip(j[None] - g4[:, None], 0, s - 1)[..., None, None], 1)
                return cur, jnp.where(first[..., None, None], o_first, o_second)

            need = jnp.any(inp["valid"] & ~first)
            cur, o = jax.lax.cond(need, second, lambda cur: (cur, o_first), cur)
            # The group straddling into the next block starts after window 1 if the carried
            # document goes on to the block end, else at a document start inside the block.
            st_out = _where_state(doc[:, -1] == doc_g, st2, fresh)
            new_prev = {n: cur[n].astype(prev[n].dtype) for n in _KEYS + _MEM}
            new_prev.update(group=group, doc=doc)
            ys = {"a": cur["a"], "o": o}
            if collect:
                ys.update({n: new_prev[n] for n in _KEYS + _MEM}, st_g=st_g, st2=st2)
            return (st_out, new_prev), ys

        (_, _), ys = jax.lax.scan(body if general else aligned, (state0, prev0), xs)
        unblk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, length, *x.shape[3:])
        out = {n: (unblk(x) if n in ("a", "o") + _KEYS + _MEM else x) for n, x in ys.items()}
        return out

    def _empty_prev(self, b, doc):
        s, z4 = self.seg, jnp.zeros((b, self.seg, self.h, self.dk), self.dtype)
        prev = {n: z4 for n in _KEYS + ("mk", "mv")}
        prev.update({n: jnp.zeros((b, s, self.h), jnp.float32) for n in ("theta", "eta", "alpha")})
        prev.update(group=jnp.full((b, s), _NO_GROUP, jnp.int32), doc=jnp.full((b, s), doc, jnp.int32))
        return prev

    def _output(self, a, o):
        r = self.memory.o_norm(o)
        g = jax.nn.sigmoid(r.astype(jnp.float32)).astype(a.dtype)
        return self.wo((a * g).reshape(*a.shape[:2], -1))

    # ------------------------------------------------------------------ Block API

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: TitansMACCache | None = None):
        if cache is not None:
            check_no_segments("TitansMAC", segment_ids)
            return self._decode(x, cache)
        b, t, _ = x.shape
        s = self.seg
        length = s * (-(-t // s))
        x = jnp.pad(x, ((0, 0), (0, length - t), (0, 0)))
        i = jnp.arange(length)
        if segment_ids is None:
            seg = None
            doc = jnp.ones((b, length), jnp.int32)
            group = jnp.broadcast_to((i // s) * s, (b, length))
            pos = jnp.broadcast_to(i, (b, length))
        else:
            seg = jnp.pad(segment_ids, ((0, 0), (0, length - t)), mode="edge")
            doc = document_ids(seg)
            pos = positions_in_segment(seg)
            group = (i - pos) + (pos // s) * s  # document start + whole segments
        feats, _ = self._features(x, pos, seg)
        feats.update(doc=doc, group=group.astype(jnp.int32), valid=jnp.broadcast_to(i < t, (b, length)))
        general = segment_ids is not None
        prev0 = self._empty_prev(b, -1) if general else None
        out = self._scan(feats, self.memory.initial_state(b), prev0, general=general)
        return self._output(out["a"][:, :t], out["o"][:, :t])

    def init_cache(self, batch_size: int, max_length: int) -> TitansMACCache:
        b = batch_size
        conv = None if self.q_conv is None else self.q_conv.init_cache(b, self.dtype)
        z = jnp.zeros((b, self.seg, self.h, self.dk), self.dtype)
        return TitansMACCache(conv, self.memory.init_cache(b).titans, z, z, z, z, jnp.zeros((), jnp.int32))

    def _decode(self, x, cache: TitansMACCache):
        """``T >= 1`` tokens from ``cache``: the block scan of the general form, its blocks starting
        at the first new token and the buffered tokens of the current segment as the previous block."""
        b, t, _ = x.shape
        s = self.seg
        pos0 = cache.pos
        c0 = pos0 % s
        length = s * (-(-t // s))
        i = jnp.arange(length)
        absolute = pos0 + i
        feats, conv = self._features(x, jnp.broadcast_to(absolute[:t], (b, t)), conv_cache=cache.conv)
        feats = {n: jnp.pad(f, [(0, 0), (0, length - t)] + [(0, 0)] * (f.ndim - 2)) for n, f in feats.items()}
        feats["pos"] = jnp.broadcast_to(absolute, (b, length))
        group = jnp.broadcast_to((absolute // s) * s - pos0, (b, length)).astype(jnp.int32)
        feats.update(doc=jnp.ones((b, length), jnp.int32), group=group,
                     valid=jnp.broadcast_to(i < t, (b, length)))
        # The buffered tokens of the current segment (absolute pos0 - c0 + k, slot k) become the
        # tail of the "previous block" (local positions -s .. -1).
        memory = cache.memory
        src = jnp.arange(s) - (s - c0)
        has = src >= 0
        roll = lambda buf: jnp.where(has.reshape((1, s) + (1,) * (buf.ndim - 2)),
                                     jnp.take(buf, jnp.clip(src, 0, s - 1), axis=1), 0).astype(buf.dtype)
        bufs = {"mk": memory.k, "mv": memory.v, "theta": memory.theta, "eta": memory.eta, "alpha": memory.alpha,
                **{n: getattr(cache, n) for n in _KEYS}}
        prev0 = {n: roll(v) for n, v in bufs.items()}
        prev0.update(group=jnp.broadcast_to(jnp.where(has, -c0, _NO_GROUP), (b, s)).astype(jnp.int32),
                     doc=jnp.ones((b, s), jnp.int32))
        out = self._scan(feats, memory.state, prev0, general=True, collect=True)
        y = self._output(out["a"][:, :t], out["o"][:, :t])
        # Memory at the start of the segment holding position pos0 + t: after window 1 of the
        # last block if that window is complete, else the state that block started from.
        g_last = group[0, length - s]
        done = jnp.broadcast_to(g_last + s <= t, (b,))
        mem_state = _where_state(done, jax.tree.map(lambda z: z[-1], out["st2"]),
                                 jax.tree.map(lambda z: z[-1], out["st_g"]))
        end = pos0 + t
        count = end % s
        start = (end // s) * s - pos0 + s  # index of the segment start in [prev0 ; blocks]
        keep = (jnp.arange(s) < count)

        def new_buf(n):
            full = jnp.concatenate([prev0[n], out[n], jnp.zeros_like(prev0[n])], axis=1)
            w = jax.lax.dynamic_slice_in_dim(full, start, s, axis=1)
            return jnp.where(keep.reshape((1, s) + (1,) * (w.ndim - 2)), w, 0).astype(bufs[n].dtype)

        new_memory = TitansCache(mem_state, new_buf("mk"), new_buf("mv"), new_buf("theta"), new_buf("eta"),
                                 new_buf("alpha"), count.astype(jnp.int32))
        return y, TitansMACCache(conv, new_memory, *(new_buf(n) for n in _KEYS), end.astype(jnp.int32))
