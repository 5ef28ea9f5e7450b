"""HBM bytes of the ``while`` loops that XLA's cost model leaves out.

``compiled.cost_analysis()["bytes accessed"]`` counts the body of a ``while`` loop once, not
once per iteration: a 64-step ``lax.scan`` is charged like one step. Every chunked memory's
state pass is such a loop, so the raw figure understates its traffic, and moving work into a
scan lowers the figure without lowering the traffic. :func:`loop_bytes` estimates what is
missing from the optimised HLO text (``compiled.as_text()``):

* per loop iteration, every instruction of the body moves its output and its operands
  (a fusion reads its operands and writes its result once: the unit XLA's model counts too);
* an operand or result whose leading dimension is the trip count (the stacked ``xs`` / ``ys``
  of a scan) counts one slice per iteration;
* an operand that is only read through a ``dynamic-slice`` (on its own or inside a fusion, on any
  axis) moves the slice, not the buffer;
* a ``dynamic-update-slice`` (on its own, or the root of a fusion, e.g. a row written into a
  matrix one substitution step at a time) is in place: it moves the update, not the buffer;
* tuple plumbing (``parameter``, ``get-tuple-element``, ``tuple``, ``bitcast``, ``constant``)
  moves nothing, and on a TPU buffers placed in VMEM (layout memory space ``S(1)``) stay on chip.

The missing bytes are ``(trips - 1) * per_iteration`` for each loop (the model already has one
iteration); loops nested in a loop body are multiplied by their parent's trip count. It is an
estimate: which buffers XLA keeps on chip between iterations is decided after this text, so
read it as the traffic of a loop whose carry goes through HBM each step. Loops inside the
branches of a ``conditional`` are not corrected (the model charges the costliest branch).
"""
from __future__ import annotations

import math
import re

ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
            "f64": 8, "s64": 8, "u64": 8}
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start", "copy-done", "after-all",
        "opt-barrier", "partition-id", "replica-id"}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(?:, |$)")


def _bytes(shape_text: str, trips: int) -> int:
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape_text):
        if dtype not in ITEMSIZE or "S(1)" in (layout or ""):
            continue
        dims = [int(d) for d in dims.split(",") if d]
        n = math.prod(dims) * ITEMSIZE[dtype]
        if len(dims) > 1 and dims[0] == trips:
            n //= trips  # a stacked scan input/output: one slice per iteration
        total += n
    return total


def _computations(hlo: str) -> dict[str, str]:
    comps = {}
    for block in re.split(r"\n(?=\S)", hlo):
        m = re.match(r"(?:ENTRY )?%?([\w.\-]+)", block.split("\n", 1)[0])
        if m:
            comps[m.group(1)] = block
    return comps


def _loops(comps: dict[str, str], name: str):
    """``(body, trips)`` of every ``while`` instruction in computation ``name``."""
    for line in comps.get(name, "").split("\n"):
        call = re.search(r" call\(.*to_apply=%?([\w.\-]+)", line)
        if call:  # a called computation runs where it is called: its loops belong here
            yield from _loops(comps, call.group(1))
        if " while(" not in line:
            continue
        body = re.search(r"body=%?([\w.\-]+)", line)
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        trips = int(known.group(1)) if known else _counted_trips(comps.get(cond.group(1), "") if cond else "")
        if body and trips:  # a loop whose trip count cannot be read is not corrected
            yield body.group(1), trips


def _counted_trips(cond_text: str) -> int | None:
    """Trips of a counted loop ``i < N`` (a scan's condition: the counter starts at 0)."""
    root = re.search(r"ROOT %?[\w.\-]+ = pred\[\]\S* compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", cond_text)
    if not root:
        return None
    limit = re.search(rf"%{re.escape(root.group(2))} = s32\[\]\S* constant\((\d+)\)", cond_text)
    return int(limit.group(1)) if limit else None


def _fusion_traffic(comps: dict[str, str], fused: str, trips: int):
    """How a fusion's operands and result move, read from its fused computation ``fused``:
    ``(charge, out)`` with ``charge[i]`` the bytes operand ``i`` moves when it is only sliced or
    updated in place (also through a nested fusion; operands not in ``charge`` move whole, by
    :func:`_bytes`) and ``out`` the correction to the result's bytes (an in-place update that is
    the result, or an element of it, writes its update, not the buffer)."""
    instrs, params, source, uses, root = {}, {}, {}, {}, None
    for line in comps.get(fused, "").split("\n")[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        ops = re.findall(r"%([\w.\-]+)", operands)
        calls = re.search(r"calls=%?([\w.\-]+)", line) if op == "fusion" else None
        instrs[name] = (shape, op, ops, calls.group(1) if calls else None)
        root = name if line.lstrip().startswith("ROOT") else root
        if op == "parameter":
            params[name], source[name] = int(operands), name
        elif op == "bitcast" and ops and ops[0] in source:
            source[name] = source[ops[0]]  # a bitcast of a parameter is that parameter
        else:
            for pos, o in enumerate(ops):
                if o in source:
                    uses.setdefault(source[o], []).append((op, pos, name))
    charge, in_place = {}, set()
    for p, idx in params.items():
        total, whole = 0, not uses.get(p)
        for op, pos, n in uses.get(p, []):
            if op == "dynamic-slice" and pos == 0:
                total += _bytes(instrs[n][0], 0)
            elif op == "dynamic-update-slice" and pos == 0:
                in_place.add(n)
            elif op == "fusion" and instrs[n][3]:
                inner, _ = _fusion_traffic(comps, instrs[n][3], trips)
                whole = whole or pos not in inner
                total += inner.get(pos, 0)
            else:
                whole = True
        if not whole:
            charge[idx] = 0 if "S(1)" in instrs[p][0] else total
    results = [root]  # the fusion's result: its root, or the elements of a root tuple
    if root is not None and instrs[root][1] == "tuple":
        results = instrs[root][2]
    out = 0
    for r in results:
        while r in instrs and instrs[r][1] == "bitcast" and r not in in_place:
            r = instrs[r][2][0]
        if r in in_place:
            shape, _, ops, _ = instrs[r]
            out += _bytes(instrs.get(ops[1], ("",))[0], 0) - _bytes(shape, trips)
    return charge, out


def per_iteration_bytes(body_text: str, trips: int, comps: dict[str, str] | None = None) -> int:
    comps = comps or {}
    sizes, total = {}, 0
    for line in body_text.split("\n")[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        sizes[name] = shape
        if op in FREE or op == "while":
            continue
        names = re.findall(r"%([\w.\-]+)", operands)
        moved = [_bytes(sizes.get(o, ""), trips) for o in names]
        if op == "dynamic-update-slice" and moved:  # in place: the update is read and written
            total += 2 * moved[1]
            continue
        if op == "dynamic-slice" and moved:  # reads the slice it returns
            total += 2 * _bytes(shape, 0)
            continue
        fused = re.search(r"calls=%?([\w.\-]+)", line) if op == "fusion" else None
        out = _bytes(shape, trips)
        if fused and fused.group(1) in comps:
            charge, correction = _fusion_traffic(comps, fused.group(1), trips)
            moved = [charge.get(i, b) for i, b in enumerate(moved)]
            out += correction
        total += out + sum(moved)
    return total


def loop_bytes(hlo: str) -> list[dict]:
    """Every loop's ``{"body", "trips", "per_iteration", "missing"}``; ``missing`` is the bytes
    XLA's cost model leaves out for that loop (nested loops scaled by their parents' trips)."""
    comps = _computations(hlo)
    entry = next((n for n, c in comps.items() if c.startswith("ENTRY")), None)
    rows, stack = [], [(entry, 1)]
    while stack:
        name, outer = stack.pop()
        for body, trips in _loops(comps, name):
            per = per_iteration_bytes(comps.get(body, ""), trips, comps)
            rows.append({"body": body, "trips": trips, "per_iteration": per,
                         "missing": (outer * trips - 1) * per})
            stack.append((body, outer * trips))
    return rows


def missing_bytes(hlo: str) -> int:
    return sum(r["missing"] for r in loop_bytes(hlo))
