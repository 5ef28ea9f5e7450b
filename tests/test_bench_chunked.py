"""Smoke test of benchmarks/bench_chunked_vs_recurrent.py at a tiny length (slow: it compiles
every mechanism's chunked and recurrent forward + backward)."""
import json

import pytest

from benchmarks import bench_chunked_vs_recurrent as bench


@pytest.mark.slow
def test_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "cvr.json"
    bench.main(["--T", "24", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["mechanism"] for r in rows] == list(bench.OPS)
    for r in rows:
        assert r["T"] == 24 and r["chunked_s"] > 0 and r["recurrent_s"] > 0
        assert r["ratio"] == pytest.approx(r["recurrent_s"] / r["chunked_s"])


def test_aliases_name_known_mechanisms():
    assert set(bench.ALIASES.values()) <= set(bench.OPS) | set(bench.EXTRA)


# The factored (tame) route of the vector-gate chunked form at its float32 limit: factors up to
# exp(44) on the keys and exp(-44) on the queries must not cost accuracy. (Kept here, next to the
# benchmark that motivated the route; tests/test_vector_gates.py covers both routes against a
# float64 reference.)
@pytest.mark.slow
@pytest.mark.parametrize("per_token", [-0.68, -0.75])  # chunk sums 43.5 (tame) and 48 (general)
def test_vector_gate_routes_at_the_float32_limit(per_token):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from memjax.memory import linear
    from memjax.memory.chunking import to_head_chunks

    r = np.random.default_rng(0)
    b, t, h, k = 1, 130, 2, 8
    q, kk, v = (jnp.asarray(r.normal(size=(b, t, h, k)), jnp.float32) for _ in range(3))
    g = jnp.asarray(per_token + 0.005 * r.uniform(size=(b, t, h, k)), jnp.float32)
    tame = linear._is_tame(to_head_chunks(g, 64), jnp.float32)
    assert bool(tame) == (per_token > -0.7)

    def run(mode):
        def loss(q, kk, v, g):
            o, s = linear.linear_attention(q, kk, v, g=g, mode=mode, chunk_size=64)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(q, kk, v, g)
        return (o, s) + tuple(grads)

    got, want = run("chunked"), run("recurrent")
    for a, w in zip(got, want):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w)) < 2e-5
