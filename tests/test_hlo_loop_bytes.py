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


def test_slices_on_inner_axes_count_the_slice_not_the_buffer():
    # a loop reading column i of x [64, 32, 256] and writing it into column i of m: every step
    # moves a few [64, 256] f32 slices (64 KiB each), not the 2 MiB buffers they are cut from
    def f(x):
        def body(i, c):
            s, m = c
            col = jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
            return s + col.sum(), jax.lax.dynamic_update_index_in_dim(m, col * 2.0, i, axis=1)

        return jax.lax.fori_loop(0, 32, body, (0.0, jnp.zeros_like(x)))

    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((64, 32, 256), jnp.float32)).compile()
    (row,) = loop_bytes(compiled.as_text())
    assert row["trips"] == 32
    col = 64 * 256 * 4
    assert 2 * col <= row["per_iteration"] <= 8 * col  # the whole buffer would be 32 columns


def test_slice_inside_a_nested_fusion():
    # TPU-style HLO: the loop body's fusion reads its [16, 1024] f32 operand only through a nested
    # fusion's dynamic-slice of one [1, 1024] row: 4 KiB a step, not the 64 KiB buffer
    hlo = """%inner (a: f32[16,1024], i: s32[]) -> f32[1024] {
  %a = f32[16,1024] parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,1024] dynamic-slice(%a, %i, %z), dynamic_slice_sizes={1,1024}
  ROOT %r = f32[1024] bitcast(%ds)
}

%outer (x: f32[16,1024], i: s32[], y: f32[1024]) -> f32[1024] {
  %x = f32[16,1024] parameter(0)
  %i = s32[] parameter(1)
  %row = f32[1024] fusion(%x, %i), kind=kLoop, calls=%inner
  %y = f32[1024] parameter(2)
  ROOT %s = f32[1024] add(%row, %y)
}

%cond (p: (s32[], f32[16,1024], f32[1024])) -> pred[] {
  %c = s32[] constant(16)
  %p = (s32[], f32[16,1024], f32[1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[16,1024], f32[1024])) -> (s32[], f32[16,1024], f32[1024]) {
  %p = (s32[], f32[16,1024], f32[1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[16,1024] get-tuple-element(%p), index=1
  %y = f32[1024] get-tuple-element(%p), index=2
  %f = f32[1024] fusion(%x, %i, %y), kind=kLoop, calls=%outer
  ROOT %t = (s32[], f32[16,1024], f32[1024]) tuple(%i, %x, %f)
}

ENTRY %main (a: f32[16,1024]) -> f32[1024] {
  %a = f32[16,1024] parameter(0)
  %z = s32[] constant(0)
  %y0 = f32[1024] constant(0)
  %t = (s32[], f32[16,1024], f32[1024]) tuple(%z, %a, %y0)
  %w = (s32[], f32[16,1024], f32[1024]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[1024] get-tuple-element(%w), index=2
}
"""
    (row,) = loop_bytes(hlo)
    assert row["trips"] == 16
    assert row["per_iteration"] == 3 * 4096 + 4  # the row read, y read, the result written; the index
