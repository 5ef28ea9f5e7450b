"""benchmarks.hlo_loop_bytes: the loop iterations XLA's cost model leaves out."""
import jax
import jax.numpy as jnp

from benchmarks.hlo_loop_bytes import loop_bytes, missing_bytes


def _scan(n):
    def f(xs):
        return jax.lax.scan(lambda c, x: (c + x.sum(), x * 2.0), 0.0, xs)

    return jax.jit(f).lower(jax.ShapeDtypeStruct((n, 64, 256), jnp.float32)).compile()


def test_scan_bytes_grow_with_its_length():
    # each iteration reads one [64, 256] f32 slice and writes one: >= 128 KiB per step
    small, large = _scan(8), _scan(64)
    rows = loop_bytes(large.as_text())
    assert [r["trips"] for r in rows] == [64]
    assert rows[0]["per_iteration"] >= 2 * 64 * 256 * 4
    raw = lambda c: c.cost_analysis()["bytes accessed"]  # noqa: E731
    corrected = lambda c: raw(c) + missing_bytes(c.as_text())  # noqa: E731
    # the io alone is 2 * n * 64 KiB; the corrected figure covers it and scales with n, the raw one does not
    assert corrected(large) >= 2 * 64 * 64 * 256 * 4
    assert 6.0 < corrected(large) / corrected(small) < 10.0
    assert raw(large) < 2 * 64 * 64 * 256 * 4


def test_counted_loop_without_backend_trip_count():
    # a TPU-style condition: ROOT compare(counter, constant N), direction=LT and no known_trip_count
    hlo = """%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[] constant(16)
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%p), index=1
  %y = f32[4] add(%x, %x)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]) tuple(%i, %y)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4]) tuple(%z, %a)
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[4] get-tuple-element(%w), index=1
}
"""
    (row,) = loop_bytes(hlo)
    assert row["trips"] == 16
    assert row["per_iteration"] == 3 * 16  # add: two f32[4] operands read, one written
    assert row["missing"] == 15 * 48
