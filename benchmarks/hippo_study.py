"""HiPPO study: online LegS / LegT reconstruction error against N, and LegS timescale robustness.

    python -m benchmarks.hippo_study                    # the full study (float64 NumPy, ~1-2 min on 1 core)
    python -m benchmarks.hippo_study --Ns 4,8 --base-len 200 --stretches 1,2 --seeds 1 --out /tmp/h

Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections". The state
``c(t) in R^N`` holds the coefficients of the projection of the history of ``f`` onto ``N``
orthonormal Legendre functions; it follows a linear ODE that is run online, one sample at a time,
with the bilinear (GBT alpha = 1/2) discretisation HiPPO and S4 use (:func:`memjax.memory.hippo.discretize`):

- **LegS** (uniform measure on ``[0, t]``): ``dc/dt = (1/t) (A c + B f)``; sample ``k = 1..T`` is
  taken with step ``dt = 1/k``: ``c_k = A_k c_{k-1} + B_k f_k``, ``A_k = (I - A/2k)^{-1} (I + A/2k)``,
  ``B_k = (I - A/2k)^{-1} B / k``. After ``T`` samples the *whole* history is read back:
  ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s / T - 1)``, ``s in [0, T]``.
- **LegT** (uniform measure on the window ``[t - theta, t]``): ``dc/dt = A c + B f`` with one
  sample per time unit (``dt = 1``, ``theta`` in samples), time-invariant ``A_d, B_d``; the last
  window is read back: ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 (s - T) / theta + 1)``.

Sample ``k`` stands for the interval ``[k - 1, k]`` and is compared with the reconstruction at
its midpoint ``s = k - 1/2``.

Signals (each normalised to zero mean and unit variance, so the MSE is relative to the signal's
power; every signal is a function of ``u in [0, 1]`` sampled at ``T = base_len * m`` points, so
stretch factor ``m`` plays the same signal ``m`` times slower):

- ``sinusoids``: 4 sinusoids, random frequencies in [1, 6] cycles per signal, random phases (smooth);
- ``bandlimited``: white noise low-passed at 20 cycles per signal (random Fourier coefficients of
  frequencies 1..20; smooth, analytic, but much richer than ``sinusoids``);
- ``white_noise``: i.i.d. N(0, 1) values at ``base_len`` points, held (piecewise constant);
- ``random_walk``: the cumulative sum of that noise, linearly interpolated (continuous, Hoelder-1/2).

Part 1 (error against N, ``T = base_len``): LegS reads back the whole history; LegT with
``theta = T`` (its window is the whole signal: the same task) does too.
Part 2 (timescale robustness): the same signals stretched by ``m in --stretches`` (``T = base_len m``):
LegS (no timescale parameter), LegT with ``theta`` fixed at ``base_len`` (tuned for ``m = 1``; it
reads back its own window, the last ``1/m`` of the signal, so its error is for a different slice
of the signal at every ``m``; asked for the whole history it can only answer 0, the mean, before its
window: ``legt_fixed_history``) and LegT with ``theta = T`` (the timescale given as an oracle).

Writes ``<out>/hippo_study.json``, ``hippo_study.md`` and ``hippo_study.png`` (default out:
``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The recurrences multiply N x N matrices (N <= 128) one sample at a time: BLAS threads only add
# synchronisation (10x slower on a loaded 2-core machine), so one thread unless the caller chose.
# Takes effect only when this module is the first to load NumPy (``python -m benchmarks.hippo_study``).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.special  # noqa: E402

from memjax.memory import hippo  # noqa: E402

SIGNALS = ("sinusoids", "bandlimited", "white_noise", "random_walk")
BAND = 20  # cycles per signal of the band-limited noise


# ----------------------------------------------------------------------------- signals


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    return x / x.std(axis=-1, keepdims=True)


def make_signal(kind: str, base_len: int, stretch: int, seed: int) -> np.ndarray:
    """Samples ``[base_len * stretch]`` (float64, zero mean, unit variance) of signal ``kind`` drawn
    with ``seed``; the same ``(kind, base_len, seed)`` at another ``stretch`` is the same function
    of ``u in [0, 1]`` sampled more densely (played ``stretch`` times slower)."""
    if kind not in SIGNALS:
        raise ValueError(f"make_signal: kind must be one of {SIGNALS}, got {kind!r}")
    if base_len < 2 or stretch < 1:
        raise ValueError(f"make_signal: need base_len >= 2 and stretch >= 1, got {base_len}, {stretch}")
    rng = np.random.default_rng([seed, SIGNALS.index(kind)])
    T = base_len * stretch
    u = (np.arange(T) + 0.5) / T  # sample k covers [k/T, (k+1)/T]; value at its midpoint
    if kind == "sinusoids":
        freqs = rng.uniform(1.0, 6.0, 4)
        phases = rng.uniform(0, 2 * np.pi, 4)
        amps = rng.uniform(0.5, 1.0, 4)
        x = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * u + phases[:, None])).sum(0)
    elif kind == "bandlimited":
        f = np.arange(1, BAND + 1)
        a, b = rng.normal(size=(2, BAND))
        x = (a[:, None] * np.cos(2 * np.pi * f[:, None] * u) + b[:, None] * np.sin(2 * np.pi * f[:, None] * u)).sum(0)
    else:
        noise = rng.normal(size=base_len)
        if kind == "white_noise":
            # Zero-order hold: a stretched white-noise signal is the same sequence of values, each held longer.
            x = noise[np.minimum((u * base_len).astype(int), base_len - 1)]
        else:
            walk = np.cumsum(noise)
            x = np.interp(u * base_len - 0.5, np.arange(base_len), walk)
    return _normalise(x)


# ----------------------------------------------------------------------------- projections


def legendre_basis(N: int, x: np.ndarray) -> np.ndarray:
    """``sqrt(2n+1) P_n(x)`` for ``n < N`` at points ``x in [-1, 1]``: ``[len(x), N]``."""
    n = np.arange(N)
    return np.sqrt(2 * n + 1) * scipy.special.eval_legendre(n[None, :], np.asarray(x, np.float64)[:, None])


def legs_online(f: np.ndarray, N: int) -> np.ndarray:
    """Run the LegS recurrence over ``f: [T]`` or ``[T, S]`` (S signals at once); returns ``c_T``:
    ``[N]`` or ``[N, S]``. Bilinear with ``dt = 1/k`` at sample ``k`` (1-based)."""
    A, B = hippo.legs(N)
    f = np.asarray(f, np.float64)
    vec = f.ndim == 1
    f2 = f[:, None] if vec else f
    c = np.zeros((N, f2.shape[1]))
    eye = np.eye(N)
    for k in range(1, f2.shape[0] + 1):
        # (I - A/2k) c_k = (I + A/2k) c_{k-1} + (B/k) f_k; A lower triangular -> triangular solve.
        rhs = c + (A @ c) / (2 * k) + np.outer(B, f2[k - 1]) / k
        c = scipy.linalg.solve_triangular(eye - A / (2 * k), rhs, lower=True, check_finite=False)
    return c[:, 0] if vec else c


def legt_online(f: np.ndarray, N: int, theta: float) -> np.ndarray:
    """Run the LegT recurrence (``theta`` in samples, one sample per time unit) over ``f: [T]`` or
    ``[T, S]``; returns ``c_T``. Bilinear discretisation with ``dt = 1``."""
    A, B = hippo.legt(N, theta=theta)
    Ad, Bd = hippo.discretize(A, B, 1.0, "bilinear")
    f = np.asarray(f, np.float64)
    vec = f.ndim == 1
    f2 = f[:, None] if vec else f
    c = np.zeros((N, f2.shape[1]))
    for k in range(f2.shape[0]):
        c = Ad @ c + np.outer(Bd, f2[k])
    return c[:, 0] if vec else c


def legs_reconstruct(c: np.ndarray, T: int) -> np.ndarray:
    """The whole history ``[T]`` (or ``[T, S]``) read back from LegS coefficients ``c_T``."""
    s = np.arange(T) + 0.5
    return legendre_basis(c.shape[0], 2 * s / T - 1) @ c


def legt_reconstruct(c: np.ndarray, T: int, theta: int) -> np.ndarray:
    """The last window (samples ``T - theta .. T - 1``) read back from LegT coefficients ``c_T``."""
    s = np.arange(T - theta, T) + 0.5
    return legendre_basis(c.shape[0], 2 * (s - T) / theta + 1) @ c


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every element (samples and signal columns)."""
    return float(np.mean((a - b) ** 2))


# ----------------------------------------------------------------------------- study


def signals_matrix(kind: str, base_len: int, stretch: int, seeds: int) -> np.ndarray:
    """``[T, seeds]``: ``seeds`` draws of one signal kind, columns processed together."""
    return np.stack([make_signal(kind, base_len, stretch, s) for s in range(seeds)], axis=1)


def run_study(Ns, base_len: int, stretches, seeds: int) -> dict:
    """Every measurement of the study (see the module docstring) as a JSON-able dict."""
    Ns, stretches = list(Ns), list(stretches)
    if 1 not in stretches:
        stretches = [1] + stretches
    rows = []
    for m in stretches:
        # All signal kinds and draws run through one recurrence as columns of F: [T, kinds * seeds].
        F = np.concatenate([signals_matrix(kind, base_len, m, seeds) for kind in SIGNALS], axis=1)
        T = F.shape[0]
        cols = {kind: slice(i * seeds, (i + 1) * seeds) for i, kind in enumerate(SIGNALS)}
        G_all = legendre_basis(max(Ns), 2 * (np.arange(T) + 0.5) / T - 1)
        for N in Ns:
            t0 = time.perf_counter()
            rec = {"legs": legs_reconstruct(legs_online(F, N), T)}
            rec["legt_fixed_theta"] = legt_reconstruct(legt_online(F, N, theta=base_len), T, base_len)
            # The same LegT state asked for the whole history: it holds nothing about samples older than
            # its window, so it can only answer 0 there (the signals' mean).
            rec["legt_fixed_history"] = np.concatenate([np.zeros((T - base_len, F.shape[1])), rec["legt_fixed_theta"]])
            rec["legt_theta_T"] = (rec["legt_fixed_theta"] if m == 1 else
                                   legt_reconstruct(legt_online(F, N, theta=T), T, T))
            # The best any N-term Legendre expansion can do on [0, T] (least squares on the samples):
            # the floor an exact online projection would reach; the gap above it is discretisation error.
            G = G_all[:, :N]
            coef, *_ = np.linalg.lstsq(G, F, rcond=None)
            rec["best_legendre"] = G @ coef
            wall = round(time.perf_counter() - t0, 3)
            for kind, c in cols.items():
                r = {"signal": kind, "stretch": m, "T": T, "N": N}
                for key, y in rec.items():
                    target = F[T - base_len:, c] if key == "legt_fixed_theta" else F[:, c]
                    r[key] = mse(y[:, c], target)
                r["wall_s_all_signals"] = wall
                rows.append(r)
    return {"Ns": Ns, "base_len": base_len, "stretches": stretches, "seeds": seeds, "band": BAND,
            "discretisation": "bilinear", "rows": rows}


def _get(rows, kind, m, key):
    """``(Ns, errors)`` of one method for one signal kind and stretch, sorted by N."""
    pts = sorted((r["N"], r[key]) for r in rows if r["signal"] == kind and r["stretch"] == m and key in r)
    return [p[0] for p in pts], [p[1] for p in pts]


def loglog_slope(Ns, errs) -> float:
    """Least-squares slope of log(err) against log(N): the algebraic decay rate."""
    Ns, errs = np.asarray(Ns, float), np.asarray(errs, float)
    keep = errs > 0
    return float(np.polyfit(np.log(Ns[keep]), np.log(errs[keep]), 1)[0]) if keep.sum() >= 2 else float("nan")


def stretch_spread(rows, kind, key, stretches) -> float:
    """max over N of ``max_m err / min_m err``: 1.0 when the error curves of all stretches coincide."""
    worst = 1.0
    Ns = sorted({r["N"] for r in rows})
    for N in Ns:
        vals = [r[key] for r in rows if r["signal"] == kind and r["N"] == N and r["stretch"] in stretches and key in r]
        if len(vals) >= 2 and min(vals) > 0:
            worst = max(worst, max(vals) / min(vals))
    return worst


def markdown(res: dict) -> str:
    """The two tables of the study (MSE against N at ``T = base_len``; stretch ratios) as Markdown."""
    rows, Ns, stretches = res["rows"], res["Ns"], res["stretches"]
    fmt = lambda v: f"{v:.2e}"
    out = [f"HiPPO online reconstruction MSE (signals normalised to unit variance; {res['seeds']} draws "
           f"averaged; bilinear; T = {res['base_len']}).", "",
           "| signal | method | " + " | ".join(f"N={n}" for n in Ns) + " | slope d log MSE / d log N |",
           "|---|---|" + "---|" * (len(Ns) + 1)]
    for kind in SIGNALS:
        for key, name in (("legs", "LegS (whole history)"), ("legt_theta_T", "LegT, theta = T"),
                          ("best_legendre", "best N-term Legendre fit")):
            n, e = _get(rows, kind, 1, key)
            out.append(f"| {kind} | {name} | " + " | ".join(fmt(v) for v in e) + f" | {loglog_slope(n, e):.2f} |")
    mmax = max(stretches)
    out += ["", f"Timescale robustness: the same signals stretched by m = {stretches} "
            f"(T = {', '.join(str(res['base_len'] * m) for m in stretches)}). Cells: MSE at m = {mmax} / "
            "MSE at m = 1 for each N (1.00 = the same error; the per-m values are in the JSON and the figure); "
            "spread = max over N and m of max_m MSE / min_m MSE.", "",
            "| signal | method | " + " | ".join(f"N={n}" for n in Ns) + " | spread |",
            "|---|---|" + "---|" * (len(Ns) + 1)]
    for kind in SIGNALS:
        for key, name in (("legs", "LegS"), ("legt_fixed_theta", f"LegT, theta = {res['base_len']} fixed, own window"),
                          ("legt_fixed_history", f"LegT, theta = {res['base_len']} fixed, whole history"),
                          ("legt_theta_T", "LegT, theta = T (oracle)"), ("best_legendre", "best Legendre fit")):
            cells = []
            for N in Ns:
                v = {r["stretch"]: r[key] for r in rows if r["signal"] == kind and r["N"] == N}
                cells.append(f"{v[mmax] / v[1]:.2f}" if v.get(1) else "")
            out.append(f"| {kind} | {name} | " + " | ".join(cells) +
                       f" | {stretch_spread(rows, kind, key, stretches):.2f} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: str) -> str:
    """Top row: MSE against N per signal; bottom row: whole-history MSE per stretch factor. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, stretches = res["rows"], res["stretches"]
    fig, axes = plt.subplots(2, len(SIGNALS), figsize=(4.2 * len(SIGNALS), 7.5), squeeze=False)
    for j, kind in enumerate(SIGNALS):
        ax = axes[0, j]
        for key, style, name in (("legs", "o-", "LegS"), ("legt_theta_T", "s--", "LegT (theta=T)"),
                                 ("best_legendre", ":", "best Legendre fit")):
            n, e = _get(rows, kind, 1, key)
            ax.plot(n, e, style, label=name)
        ax.set(xscale="log", yscale="log", title=f"{kind}, T={res['base_len']}", xlabel="N", ylabel="MSE")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-9))  # the exact fit reaches 1e-30: keep the methods readable
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for i, m in enumerate(stretches):
            color = f"C{i}"
            n, e = _get(rows, kind, m, "legs")
            ax.plot(n, e, "o-", color=color, label=f"LegS m={m}")
            n, e = _get(rows, kind, m, "legt_fixed_history")
            ax.plot(n, e, "x--", color=color, alpha=0.7, label=f"LegT theta={res['base_len']} m={m}")
        ax.set(xscale="log", yscale="log", title=f"{kind}, m x slower: whole history", xlabel="N",
               ylabel="MSE")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-9))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--Ns", default="4,8,16,32,64,128")
    p.add_argument("--base-len", type=int, default=1000)
    p.add_argument("--stretches", default="1,2,4,8")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    Ns = [int(x) for x in a.Ns.split(",")]
    stretches = [int(x) for x in a.stretches.split(",")]
    if any(n <= 0 for n in Ns) or any(m <= 0 for m in stretches) or a.seeds <= 0 or a.base_len < 2:
        p.error("--Ns, --stretches and --seeds must be positive, --base-len >= 2")
    t0 = time.perf_counter()
    res = run_study(Ns, a.base_len, stretches, a.seeds)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["command"] = " ".join(["python -m benchmarks.hippo_study", *(sys.argv[1:] if argv is None else argv)])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "hippo_study.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(a.out, "hippo_study.md"), "w") as f:
        f.write(md)
    print(md)
    print("figure:", plot(res, os.path.join(a.out, "hippo_study.png")), f"({res['wall_s']} s)")
    return res


if __name__ == "__main__":
    main()
