"""Titans MAC block: memory as context (Behrouz et al. 2025, section 4.1).

``titans_mac`` (memory as context, alias ``MAC``; paper section 4.1): segments of ``segment``
tokens; each segment retrieves ``h = M_{s-1}(q(x))`` from the memory as it stood at the segment
start, attends over ``[persistent tokens || h || x_segment]`` (causal: token ``i`` sees all
persistent tokens and ``h_j, x_j`` for ``j <= i`` of its segment), then writes the memory with
the attention output ``y`` (one chunk of the chunked form per segment, ``chunk_size = segment``)
and gates the attention output with the memory's read at ``y``::

    a = Attn(x; P, h, x) ;  y = a W_y ;  M_s = write(M_{s-1}; y) ;  out = W_o(a * sigmoid(RMSNorm(M_s(q(y)))))

(``M_s`` read per token, written only with ``y_j, j <= i``; see :class:`TitansMAC` for the exact
masking and packing rules). ``titans_mac`` has its own decoding state (see the class).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.attention import rope
from memjax.memory.neural_memory import ACTIVATIONS, TitansCache, TitansState, titans, titans_init_cache
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.titans import NeuralMemory, SlidingWindowAttention, TitansOptions


@dataclasses.dataclass
class TitansMACOptions:
    segment: int = 16  # segment length = the memory's chunk size (1: per-token memory updates)
    num_persistent: int = 4  # learned persistent-memory tokens prepended to every segment (0: none)
    depth: int = 1  # memory MLP layers (1: linear memory K -> V)
    memory_expansion: int = 2  # hidden width of the memory MLP = head_dim * memory_expansion
    activation: str = "silu"  # between memory MLP layers: "silu" or "gelu"
    conv_width: int = 4  # causal depthwise short conv on the retrieval query; 0: none
    theta_max: float = 0.0  # upper bound of the memory learning rate; 0: as in TitansOptions
    eta_bias: float = 0.0  # initial momentum decay sigmoid(eta_bias)
    alpha_bias: float = -5.0  # initial weight decay sigmoid(alpha_bias)

    def memory_options(self) -> TitansOptions:
        """The neural memory's options: chunk = segment; no short conv of its own (y already
        mixes its segment; the retrieval query has its own conv)."""
        return TitansOptions(chunk_size=self.segment, window=self.segment, depth=self.depth,
                             memory_expansion=self.memory_expansion, activation=self.activation,
                             conv_width=0, theta_max=self.theta_max, eta_bias=self.eta_bias,
                             alpha_bias=self.alpha_bias)

    def validate(self, m, where):
        if self.segment < 1:
            raise ConfigError(f"config key '{where}.segment' must be >= 1, got {self.segment}")
        for key in ("num_persistent", "conv_width"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{where}.{key}' must be >= 0, got {getattr(self, key)}")
        self.memory_options().validate(m, where)  # depth, memory_expansion, activation, theta_max


_NO_GROUP = -(2 ** 30)  # group id of empty key slots: equal to no query's group


def _memory_read(ws, q, act):
    """``M_W(q)`` without an update: ``q [B, N, H, K]``, ``ws`` layers ``[B, H, I, O]`` or ``[H, I, O]``."""
    x = q.astype(jnp.float32)
    for i, w in enumerate(ws):
        x = jnp.einsum("bnhd,bhde->bnhe" if w.ndim == 4 else "bnhd,hde->bnhe", x, w.astype(jnp.float32))
        if i < len(ws) - 1:
            x = act(x)
    return x.astype(q.dtype)


def _window(x, start, n):
    """Per-row time window ``x[b, start[b] : start[b] + n]`` of ``x [B, L, ...]``."""
    idx = start[:, None] + jnp.arange(n)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _where_state(pred, a, b):
    """Per batch row ``pred [B]``: TitansState ``a`` where true, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


_KEYS = ("kx", "vx", "kh", "vh")  # attention keys / values of segment tokens and retrieved tokens
_MEM = ("mk", "mv", "theta", "eta", "alpha")  # memory writes derived from the attention output y


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

    Decoding state: the memory cache (:class:`memjax.memory.neural_memory.TitansCache`: the memory at
    the start of the current segment and the memory writes of its tokens so far), the attention
    keys/values of the current segment's tokens and retrieved tokens, the short-conv window and
    the position. ``prefill`` runs the same block scan starting mid-segment (its blocks start at
    the first new token, as packed documents do) and ``step`` is a prefill of one token.
    """

    Options = TitansMACOptions
    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        self.seg = opts.segment
        self.h, self.dk = cfg.num_heads, cfg.resolved_head_dim
        h, dk, d, dt = self.h, self.dk, cfg.d_model, jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.memory = NeuralMemory(cfg, opts.memory_options(), rngs=rngs)
        w = opts.conv_width
        self.q_conv = ShortConv(h * dk, w, rngs=rngs, axes=("heads",)) if w > 0 else None
        self.attn = SlidingWindowAttention(cfg, opts.segment, rngs=rngs)  # projections, RoPE, o_norm
        self.persistent = (param(rngs, nnx.initializers.normal(1.0), (opts.num_persistent, d),
                                 ("memory_slots", "embed")) if opts.num_persistent else None)
        self.h_norm = RMSNorm(dk, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))
        self.wh = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.wy = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    # ------------------------------------------------------------------ pieces

    def _heads(self, z):
        return z.reshape(*z.shape[:2], self.h, self.dk)

    def _features(self, x, positions, segment_ids=None, conv_state=None):
        """Position-wise projections of the segment tokens (retrieval query with its short conv)."""
        raw = self.memory.wq(x)
        new_conv = None
        if self.q_conv is not None:
            if conv_state is None:
                raw = self.q_conv(raw, segment_ids)
            else:
                w1 = self.opts.conv_width - 1
                full = jnp.concatenate([conv_state.astype(raw.dtype), raw], axis=1)
                raw = self.q_conv(full)[:, w1:]
                new_conv = full[:, full.shape[1] - w1:].astype(conv_state.dtype)
        qa = self._heads(self.attn.wq(x))
        return {"qx": l2_normalize(jax.nn.silu(self._heads(raw))), "qp": qa,
                "qr": rope(qa, positions, self.attn.theta),
                "kx": rope(self._heads(self.attn.wk(x)), positions, self.attn.theta),
                "vx": self._heads(self.attn.wv(x)), "pos": positions}, new_conv

    def _fresh(self, b):
        w = tuple(jnp.broadcast_to(p.astype(jnp.float32)[None], (b,) + p.shape) for p in self.memory._weights0())
        return TitansState(w, tuple(jnp.zeros_like(x) for x in w))

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
        mq, mk, mv, _ = self.memory._project(y)
        theta, eta, alpha = self.memory._gates(y)
        return {"a": a, "kh": kh, "vh": vh, "kx": inp["kx"], "vx": inp["vx"], "mq": mq, "mk": mk, "mv": mv,
                "theta": theta, "eta": eta, "alpha": alpha}

    def _write(self, cur, state, segment_ids=None):
        c = self.seg
        return titans(cur["mq"], cur["mk"], cur["mv"], cur["theta"], cur["eta"], cur["alpha"],
                      params0=self.memory._weights0(), initial_state=state, activation=self.opts.activation,
                      segment_ids=segment_ids, mode="recurrent" if c == 1 else "chunked", chunk_size=c)

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
        act = ACTIVATIONS[self.opts.activation]
        w0 = self.memory._weights0()
        fresh = self._fresh(b)
        j = jnp.arange(s)
        blk = lambda x: jnp.moveaxis(x.reshape(b, nb, s, *x.shape[2:]), 1, 0)
        xs = {n: blk(x) for n, x in feats.items()}
        xs["b0"] = jnp.arange(nb, dtype=jnp.int32) * s

        def aligned(carry, inp):
            st_g, _ = carry
            cur = self._segment_pass(inp, _memory_read(st_g.weights, inp["qx"], act), None)
            o, st2 = self._write(cur, st_g)
            return (st2, None), {"a": cur["a"], "o": o}

        def body(carry, inp):
            st_g, prev = carry
            doc, group = inp["doc"], inp["group"]
            g, doc_g = group[:, 0], doc[:, 0]
            st_g = _where_state(doc_g == prev["doc"][:, -1], st_g, fresh)  # a document starts here
            in_doc = doc == doc_g[:, None]
            h0 = _memory_read(st_g.weights, inp["qx"], act)
            h = jnp.where(in_doc[..., None, None], h0, _memory_read(w0, inp["qx"], act))
            cur = self._segment_pass(inp, h, prev)
            # Window 1: the group carried in, from its start g (possibly in the previous block).
            off2 = g - (inp["b0"] - s)  # in [1, s]
            cat = lambda n: jnp.concatenate([prev[n], cur[n] if n in cur else inp[n]], axis=1)
            win = lambda n: _window(cat(n), off2, s)
            q2 = _window(jnp.concatenate([jnp.zeros_like(cur["mq"]), cur["mq"]], axis=1), off2, s)
            o2, st2 = titans(q2, *(win(n) for n in _MEM), params0=w0, initial_state=st_g,
                             activation=self.opts.activation, segment_ids=win("doc"),
                             mode="recurrent" if s == 1 else "chunked", chunk_size=s)
            o_first = _window(jnp.concatenate([o2, o2], axis=1), s - off2, s)  # valid where j < off2
            first = j[None] < off2[:, None]

            def second(cur):
                # Tokens at or after g + s: the next group of the carried document retrieves from
                # the memory after window 1; then window 2 from the group start g4 of position g + s.
                h1 = jnp.where((in_doc & ~first)[..., None, None], _memory_read(st2.weights, inp["qx"], act), h)
                cur = self._segment_pass(inp, h1, prev)
                j4 = jnp.minimum(off2, s - 1)[:, None]
                cont = jnp.take_along_axis(doc, j4, 1)[:, 0] == doc_g
                g4 = jnp.clip(jnp.take_along_axis(group, j4, 1)[:, 0] - inp["b0"], 0, s - 1)
                pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
                win4 = lambda x: _window(pad(x), g4, s)
                doc4 = _window(jnp.concatenate([doc, jnp.full_like(doc, -1)], axis=1), g4, s)
                o4, _ = titans(win4(cur["mq"]), *(win4(cur[n]) for n in _MEM), params0=w0,
                               initial_state=_where_state(cont, st2, fresh), activation=self.opts.activation,
                               segment_ids=doc4, mode="recurrent" if s == 1 else "chunked", chunk_size=s)
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

    def __call__(self, x, *, segment_ids=None, tokens=None):
        b, t, _ = x.shape
        s = self.seg
        length = s * (-(-t // s))
        x = jnp.pad(x, ((0, 0), (0, length - t), (0, 0)))
        i = jnp.arange(length)
        if segment_ids is None:
            seg = None
            doc = jnp.ones((b, length), jnp.int32)
            group = jnp.broadcast_to((i // s) * s, (b, length))
            positions = jnp.broadcast_to(i, (b, length))
        else:
            seg = jnp.pad(segment_ids, ((0, 0), (0, length - t)), mode="edge")
            starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
            doc = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
            doc_start = jax.lax.cummax(jnp.where(starts, i, 0), axis=1)
            positions = i - doc_start
            group = doc_start + (positions // s) * s
        feats, _ = self._features(x, positions, seg)
        feats.update(doc=doc, group=group.astype(jnp.int32), valid=jnp.broadcast_to(i < t, (b, length)))
        general = segment_ids is not None
        prev0 = self._empty_prev(b, -1) if general else None
        out = self._scan(feats, self._fresh(b), prev0, general=general)
        return self._output(out["a"][:, :t], out["o"][:, :t])

    def init_state(self, batch_size: int, max_len: int):
        b, s = batch_size, self.seg
        conv = None
        if self.q_conv is not None:
            conv = self.q_conv.init_state(b, self.h * self.dk, self.dtype)
        cache = titans_init_cache(b, self.h, self.dk, self.dk, params0=self.memory._weights0(), chunk_size=s)
        z = jnp.zeros((b, s, self.h, self.dk), self.dtype)
        return {"conv": conv, "cache": cache, **{n: z for n in _KEYS}, "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, state, *, tokens=None):
        b, t, _ = x.shape
        s = self.seg
        pos0 = state["pos"]
        c0 = pos0 % s
        length = s * (-(-t // s))
        i = jnp.arange(length)
        absolute = pos0 + i
        feats, conv = self._features(x, jnp.broadcast_to(absolute[:t], (b, t)), conv_state=state["conv"])
        feats = {n: jnp.pad(f, [(0, 0), (0, length - t)] + [(0, 0)] * (f.ndim - 2)) for n, f in feats.items()}
        feats["pos"] = jnp.broadcast_to(absolute, (b, length))
        group = jnp.broadcast_to((absolute // s) * s - pos0, (b, length)).astype(jnp.int32)
        feats.update(doc=jnp.ones((b, length), jnp.int32), group=group,
                     valid=jnp.broadcast_to(i < t, (b, length)))
        # The buffered tokens of the current segment (absolute pos0 - c0 + k, slot k) become the
        # tail of the "previous block" (local positions -s .. -1).
        cache = state["cache"]
        src = jnp.arange(s) - (s - c0)
        has = src >= 0
        roll = lambda buf: jnp.where(has.reshape((1, s) + (1,) * (buf.ndim - 2)),
                                     jnp.take(buf, jnp.clip(src, 0, s - 1), axis=1), 0).astype(buf.dtype)
        bufs = {"mk": cache.k, "mv": cache.v, "theta": cache.theta, "eta": cache.eta, "alpha": cache.alpha,
                **{n: state[n] for n in _KEYS}}
        prev0 = {n: roll(v) for n, v in bufs.items()}
        prev0.update(group=jnp.broadcast_to(jnp.where(has, -c0, _NO_GROUP), (b, s)).astype(jnp.int32),
                     doc=jnp.ones((b, s), jnp.int32))
        out = self._scan(feats, cache.state, prev0, general=True, collect=True)
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

        new_cache = TitansCache(mem_state, new_buf("mk"), new_buf("mv"), new_buf("theta"), new_buf("eta"),
                                new_buf("alpha"), count.astype(jnp.int32))
        return y, {"conv": conv, "cache": new_cache, **{n: new_buf(n) for n in _KEYS}, "pos": end}

    def step(self, x, state, *, token=None):
        y, state = self.prefill(x[:, None, :], state)
        return y[:, 0], state
