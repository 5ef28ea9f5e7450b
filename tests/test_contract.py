"""The contract of memjax.memory.contract, checked on every sequence memory and mode.

(a) bf16 inputs: the output is bf16, every final-state leaf float32, and the output and final
    state are within a stated relative error of a float64 run on the same (bf16-rounded) inputs;
(b) float32 inputs: float32 output and state;
(c) an integer first input (``q``, or ``x`` for the element-wise memories) is a ``TypeError``
    naming it and its dtype;
(d) a wrongly shaped gate, ``initial_state`` or ``segment_ids`` is a ``ValueError`` naming it;
(e) no blanket upcast: the jaxpr of a bf16 chunked call has a ``dot_general`` whose operands are
    bf16 and whose result is float32 (float32 accumulation of bf16 matmuls).

Error measure: relative max error ``max|x - ref| / max|ref|`` over the output and over the final
state (every leaf). Bounds are about 2-3x the errors measured with these inputs (noted next to
each); bf16 rounding of the inputs is shared by both runs, so what is measured is the
computation's own error: bf16 matmul operands, bf16 per-chunk intermediates, the bf16 output.
Shapes are small (B = 2, T = 40, H = 2, K = V = 8, chunks of 16 with a padded tail, two packed
documents) to keep the file fast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory import delta_product, delta_rule, diagonal_ssm, linear_attention, mixture_of_memories, rglru, selective_scan, titans
from memjax.memory.neural_memory import TitansState
from tests.helpers import jaxpr_eqns, rand, rel_err, uniform

B, T, H, K, V = 2, 40, 2, 8, 8
CHUNK = 16
SEG = np.repeat([[3, 7]], B, 0).repeat([23, T - 23], axis=1)  # a document boundary inside chunk 1

# kind of every argument: "act" (activations: the tested dtype), "par" (parameters and states:
# float32, float64 for float64 runs), "int" (segment ids)
ACT, PAR, INT = "act", "par", "int"


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(name):
    """``(fn, args)``: ``fn(mode, **args) -> (output, final_state)``; ``args`` maps each name to
    ``(float64 NumPy value, kind)``."""
    rng = np.random.default_rng(0)  # one stream for all the arguments
    n = lambda *s, scale=1.0: np.asarray(rand(rng, s, jnp.float32, scale=scale), np.float64)
    u = lambda lo, hi, *s: np.asarray(uniform(rng, s, lo, hi, jnp.float32), np.float64)
    seg = (SEG, INT)
    if name == "linear_attention":
        args = dict(q=(n(B, T, H, K), ACT), k=(n(B, T, H, K), ACT), v=(n(B, T, H, V), ACT),
                    g=(-u(0.0, 0.3, B, T, H), ACT), initial_state=(n(B, H, K, V), PAR), segment_ids=seg)
        return lambda mode, q, k, v, **kw: linear_attention(q, k, v, mode=mode, chunk_size=CHUNK, **kw), args
    if name == "delta_rule":
        args = dict(q=(n(B, T, H, K), ACT), k=(_l2(n(B, T, H, K)), ACT), v=(n(B, T, H, V), ACT),
                    beta=(u(0.1, 0.9, B, T, H), ACT), g=(-u(0.0, 0.3, B, T, H), ACT),
                    initial_state=(n(B, H, K, V), PAR), segment_ids=seg)
        return lambda mode, q, k, v, beta, **kw: delta_rule(q, k, v, beta, mode=mode, chunk_size=CHUNK, **kw), args
    if name == "delta_product":  # n_h = 2 Householder steps per token, beta in (0, 2) (negative eigenvalues)
        args = dict(q=(n(B, T, H, K), ACT), k=(_l2(n(B, T, 2, H, K)), ACT), v=(n(B, T, 2, H, V), ACT),
                    beta=(u(0.1, 1.9, B, T, 2, H), ACT), g=(-u(0.0, 0.3, B, T, H), ACT),
                    initial_state=(n(B, H, K, V), PAR), segment_ids=seg)
        return lambda mode, q, k, v, beta, **kw: delta_product(q, k, v, beta, mode=mode, chunk_size=CHUNK, **kw), args
    if name == "selective_scan":
        args = dict(x=(n(B, T, H, V), ACT), dt=(u(0.05, 0.5, B, T, H), ACT), A=(-u(0.2, 1.5, H), PAR),
                    B=(n(B, T, 1, K), ACT), C=(n(B, T, 1, K), ACT), D=(n(H), PAR),
                    initial_state=(n(B, H, V, K), PAR), segment_ids=seg)
        return (lambda mode, x, dt, A, B, C, **kw: selective_scan(x, dt, A, B, C, mode=mode, chunk_size=CHUNK, **kw),
                args)
    if name == "diagonal_ssm":
        cplx = lambda *s: n(*s) + 1j * n(*s)
        args = dict(x=(n(B, T, H), ACT), A=(-u(0.1, 1.0, H, K) + 3j * n(H, K), PAR), B=(cplx(H, K), PAR),
                    C=(cplx(H, K), PAR), dt=(u(0.05, 0.5, H), PAR), D=(n(H), PAR),
                    initial_state=(cplx(B, H, K), PAR), segment_ids=seg)

        return lambda mode, x, A, B, C, dt, **kw: diagonal_ssm(x, A, B, C, dt, mode=mode, chunk_size=CHUNK, **kw), args
    if name == "rglru":
        args = dict(x=(n(B, T, V), ACT), gate_a=(n(B, T, V), ACT), gate_x=(n(B, T, V), ACT),
                    lam=(np.log(0.95 / 0.05) + n(V, scale=0.5), PAR), initial_state=(n(B, V), PAR), segment_ids=seg)
        return lambda mode, x, gate_a, gate_x, lam, **kw: rglru(x, gate_a, gate_x, lam, mode=mode, **kw), args
    if name == "titans":
        state = TitansState((n(B, H, K, V, scale=0.3),), (n(B, H, K, V, scale=0.05),))
        args = dict(q=(n(B, T, H, K), ACT), k=(_l2(n(B, T, H, K)), ACT), v=(n(B, T, H, V), ACT),
                    theta=(u(0.0, 0.3, B, T, H), ACT), eta=(u(0.3, 0.95, B, T, H), ACT),
                    alpha=(u(0.0, 0.2, B, T, H), ACT), initial_state=(state, PAR), segment_ids=seg)
        return (lambda mode, q, k, v, theta, eta, alpha, **kw: titans(q, k, v, theta, eta, alpha, mode=mode,
                                                                      chunk_size=8, **kw), args)
    if name == "mixture_of_memories":
        m = 3  # plus the shared memory
        args = dict(q=(n(B, T, H, K), ACT), k=(_l2(n(B, T, m + 1, H, K)), ACT), v=(n(B, T, m + 1, H, V), ACT),
                    router_logits=(n(B, T, m), ACT), beta=(u(0.1, 0.9, B, T, m + 1, H), ACT),
                    g=(-u(0.0, 0.3, B, T, m + 1, H), ACT), initial_state=(n(B, m + 1, H, K, V), PAR),
                    segment_ids=seg)
        return (lambda mode, q, k, v, router_logits, **kw: mixture_of_memories(
            q, k, v, router_logits, top_k=2, memory="delta", mode=mode, chunk_size=CHUNK, **kw), args)
    raise KeyError(name)


def cast(args, dtype):
    """The arguments as arrays: activations in ``dtype``, parameters and states in float32 (complex64),
    or float64 (complex128) when ``dtype`` is float64."""
    wide = jnp.dtype(dtype) == jnp.float64

    def one(x, kind):
        if kind == INT:
            return jnp.asarray(x, jnp.int32)
        if np.iscomplexobj(x):
            return jnp.asarray(x, jnp.complex128 if wide else jnp.complex64)
        return jnp.asarray(x, dtype if kind == ACT else (jnp.float64 if wide else jnp.float32))

    return {name: jax.tree.map(lambda leaf, kind=kind: one(np.asarray(leaf), kind), value)
            for name, (value, kind) in args.items()}


def widen(args):
    """float64 / complex128 copies of arrays (the exact values, for the reference run)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            return x.astype(jnp.complex128)
        return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(one, args)


# (memory, mode, bound on the bf16 relative max error of the output and of the final state). The
# comment holds what was measured (CPU, XLA): output / state. The output's own bf16 rounding is
# ~2e-3 of this measure; the chunked forms add bf16 per-chunk operands (scores, decayed q and k,
# UT-transformed values, the state read as a bf16 operand), the recurrent ones work per token at
# float32.
BF16_CASES = [
    ("linear_attention", "chunked", 7e-3),  # 2.8e-3 / 1.3e-3
    ("linear_attention", "recurrent", 5e-3),  # 2.1e-3 / 7.2e-8
    ("linear_attention", "parallel", 7e-3),  # 2.8e-3 / 1.1e-3
    ("delta_rule", "chunked", 1.5e-2),  # 3.7e-3 / 6.0e-3
    ("delta_rule", "recurrent", 6e-3),  # 2.2e-3 / 1.3e-7
    ("delta_product", "chunked", 1.8e-2),  # 6.2e-3 / 7.3e-3
    ("delta_product", "recurrent", 6e-3),  # 2.7e-3 / 1.1e-7
    ("selective_scan", "chunked", 1.6e-2),  # 6.3e-3 / 2.1e-3
    ("selective_scan", "recurrent", 5e-3),  # 1.9e-3 / 8.8e-8
    ("diagonal_ssm", "chunked", 7e-3),  # 2.8e-3 / 1.4e-3
    ("diagonal_ssm", "conv", 6e-3),  # 2.3e-3 / 8.9e-8
    ("diagonal_ssm", "scan", 6e-3),  # 2.4e-3 / 1.6e-7
    ("diagonal_ssm", "recurrent", 6e-3),  # 2.4e-3 / 1.3e-7
    ("rglru", "scan", 8e-3),  # 3.3e-3 / 1.1e-7
    ("rglru", "recurrent", 8e-3),  # 3.3e-3 / 8.8e-8
    ("titans", "chunked", 7e-3),  # 2.7e-3 / 8.9e-8 (the memory meets bf16 inputs promoted)
    ("titans", "recurrent", 6e-3),  # 2.4e-3 / 1.2e-7
    ("mixture_of_memories", "chunked", 1e-2),  # 3.9e-3 / 3.7e-3
    ("mixture_of_memories", "recurrent", 6e-3),  # 2.5e-3 / 8.4e-8
]
MEMORIES = sorted({name for name, _, _ in BF16_CASES})
CHUNKED = sorted({name for name, mode, _ in BF16_CASES if mode == "chunked"})  # rglru has no chunked form


def _is_float32(x):
    return x.dtype in (jnp.float32, jnp.complex64)


_REFERENCES = {}


def reference(name, mode, x):
    """The float64 run on the same values. Every form of a memory computes the same function
    (exactly, in float64), so one reference per memory serves all its modes, except Titans'
    chunked form (a different algorithm) and the diagonal SSM's conv form (no segment_ids)."""
    ref_mode = mode if name == "titans" else "recurrent"
    key = (name, ref_mode, "segment_ids" in x)
    if key not in _REFERENCES:
        fn, _ = build(name)
        with jax.enable_x64(True):
            _REFERENCES[key] = jax.jit(lambda a: fn(ref_mode, **a))(widen(x))
    return _REFERENCES[key]


def inputs(name, mode, dtype):
    """``(fn, arguments in dtype)`` for one memory and mode."""
    fn, args = build(name)
    x = cast(args, dtype)
    if mode == "conv":
        del x["segment_ids"]  # the FFT form refuses resets
    return fn, x


def bf16_errors(name, mode):
    """``(output, final_state, relative max error of the output, of the state)`` for bf16 inputs."""
    fn, x = inputs(name, mode, jnp.bfloat16)
    out, state = jax.jit(lambda a: fn(mode, **a))(x)
    ref_out, ref_state = reference(name, mode, x)
    assert ref_out.dtype == jnp.float64
    err_s = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)))
    return out, state, rel_err(out, ref_out), err_s


@pytest.mark.parametrize("name,mode,bound", BF16_CASES)
def test_bf16_in_bf16_out_float32_state_close_to_float64(name, mode, bound):
    out, state, err_o, err_s = bf16_errors(name, mode)
    assert out.dtype == jnp.bfloat16, out.dtype
    assert all(_is_float32(leaf) for leaf in jax.tree.leaves(state)), jax.tree.map(lambda s: s.dtype, state)
    assert err_o < bound and err_s < bound, (name, mode, err_o, err_s)


@pytest.mark.parametrize("name,mode", [(n, m) for n, m, _ in BF16_CASES])
def test_float32_in_float32_out(name, mode):
    fn, x = inputs(name, mode, jnp.float32)
    out, state = jax.eval_shape(lambda a: fn(mode, **a), x)
    assert out.dtype == jnp.float32
    assert all(_is_float32(leaf) for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("name", MEMORIES)
def test_integer_first_input_is_a_type_error(name):
    fn, args = build(name)
    x = cast(args, jnp.float32)
    first = next(iter(x))  # q, or x for the element-wise memories
    x[first] = x[first].astype(jnp.int32)
    mode = next(m for n, m, _ in BF16_CASES if n == name)
    with pytest.raises(TypeError, match=rf"{name}: {first} must have a floating dtype .*got int32"):
        fn(mode, **x)


# The gates (per memory) whose shape is checked; initial_state and segment_ids for every memory.
GATES = {"linear_attention": ["g"], "delta_rule": ["beta", "g"], "delta_product": ["beta", "g"],
         "selective_scan": ["dt", "A", "D"],
         "diagonal_ssm": ["dt", "D"], "rglru": ["gate_a", "gate_x", "lam"], "titans": ["theta", "eta", "alpha"],
         "mixture_of_memories": ["beta", "g"]}


@pytest.mark.parametrize("name,arg", [(n, a) for n in MEMORIES for a in GATES[n] + ["initial_state", "segment_ids"]])
def test_wrong_shapes_are_value_errors_naming_the_argument(name, arg):
    fn, args = build(name)
    x = cast(args, jnp.float32)
    if arg == "segment_ids":
        x[arg] = x[arg][:, :-1]  # [B, T - 1]
        label = "segment_ids"
    elif name == "titans" and arg == "initial_state":
        x[arg] = TitansState(x[arg].weights, (x[arg].momentum[0][:, :1],))
        label = r"initial_state.momentum\[0\]"
    else:
        x[arg] = x[arg][..., :1]  # the last axis cut to 1
        label = arg
    mode = "scan" if name == "diagonal_ssm" else next(m for n, m, _ in BF16_CASES if n == name)
    with pytest.raises(ValueError, match=rf"{name}: {label} must have shape .*got \("):
        fn(mode, **x)


@pytest.mark.parametrize("name", CHUNKED)
def test_bf16_chunked_matmuls_keep_bf16_operands_and_accumulate_in_float32(name):
    fn, x = inputs(name, "chunked", jnp.bfloat16)
    dots = jaxpr_eqns(lambda a: fn("chunked", **a), x, primitive="dot_general")
    bf16_in_f32_out = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
                       and e.outvars[0].aval.dtype == jnp.float32]
    assert bf16_in_f32_out, [(tuple(v.aval.dtype.name for v in e.invars), e.outvars[0].aval.dtype.name) for e in dots]
