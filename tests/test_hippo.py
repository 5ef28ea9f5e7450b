"""HiPPO matrices: closed forms, online projection reconstructs the input, discretisation, S4D inits.

All in float64 NumPy. Reconstruction tolerances are stated per test (relative RMS error on a fine
grid); closed forms are compared to 1e-12.
"""
import numpy as np
import pytest
import scipy.linalg
from scipy.special import eval_laguerre, eval_legendre

from memjax.memory import hippo


def test_legs_entries_equal_closed_form():
    N = 7
    A, B = hippo.legs(N)
    assert A.shape == (N, N) and B.shape == (N,) and A.dtype == B.dtype == np.float64
    for n in range(N):
        assert B[n] == pytest.approx(np.sqrt(2 * n + 1), rel=1e-14)
        for k in range(N):
            expected = np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1) if n > k else (n + 1 if n == k else 0.0)
            assert A[n, k] == pytest.approx(-expected, rel=1e-14, abs=0)


def test_legs_equals_s4_similarity_construction():
    """S4 builds LegS as T M T^-1, M_nk = -(2k+1) (n > k), -(n+1) (n = k); T = diag(sqrt(2n+1))."""
    N = 9
    q = np.arange(N, dtype=np.float64)
    col, row = np.meshgrid(q, q)
    M = -(np.where(row >= col, 2 * q + 1, 0) - np.diag(q))  # 2q+1 broadcasts over columns
    T = np.diag(np.sqrt(2 * q + 1))
    A, B = hippo.legs(N)
    np.testing.assert_allclose(A, T @ M @ np.linalg.inv(T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B, np.sqrt(2 * q + 1), rtol=1e-14)


def _legs_online(N, f, L):
    """Online LegS projection of ``f`` sampled at the midpoints of L steps of [0, 1].

    Step k covers t in [k-1, k] (t in units of the step): the first step is the exact projection of
    a constant (c = f e_0); later steps discretise dc/dt = (1/t)(A c + B f) with the bilinear (GBT)
    transform in log time, dt_k = log(k / (k-1)) ~ 1/t at the step's midpoint, which makes the
    ODE time invariant (HiPPO's dt = 1/t rule to second order).
    """
    A, B = hippo.legs(N)
    c = np.zeros(N)
    c[0] = f(0.5 / L)
    for k in range(2, L + 1):
        Ad, Bd = hippo.discretize(A, B, np.log(k / (k - 1)), "bilinear")
        c = Ad @ c + Bd * f((k - 0.5) / L)
    return c


def test_online_legs_projection_reconstructs_signal_better_with_larger_N():
    f = lambda s: np.sin(60 * s) + np.cos(22.2 * s * s) + s
    s = (np.arange(2000) + 0.5) / 2000
    errors = []
    for N in (8, 16, 32, 64):
        c = _legs_online(N, f, L=2000)
        # f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s / t - 1) on [0, t], here t = 1.
        rec = sum(c[n] * np.sqrt(2 * n + 1) * eval_legendre(n, 2 * s - 1) for n in range(N))
        errors.append(np.sqrt(np.mean((rec - f(s)) ** 2) / np.mean(f(s) ** 2)))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors  # measured: 0.73, 0.57, 0.089, 3.8e-4


def _online_lti(A, B, f, dt, t_end):
    Ad, Bd = hippo.discretize(A, B, dt, "zoh")
    c = np.zeros(A.shape[0])
    steps = int(round(t_end / dt))
    for k in range(steps):
        c = Ad @ c + Bd * f((k + 0.5) * dt)
    return c, steps * dt


def test_legt_reconstructs_the_last_window():
    """theta = 1: the coefficients describe f on [t - 1, t]."""
    f = lambda t: np.sin(3 * t) + 0.5 * np.cos(7 * t)
    errs = []
    for N in (4, 8, 16):
        c, t = _online_lti(*hippo.legt(N), f, 1e-3, 3.0)
        s = t - 1 + (np.arange(500) + 0.5) / 500
        rec = sum(c[n] * np.sqrt(2 * n + 1) * eval_legendre(n, 2 * (s - t) + 1) for n in range(N))
        errs.append(np.sqrt(np.mean((rec - f(s)) ** 2)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs  # measured 0.3, 9.7e-4, 2e-6
    # theta scales the window: legt(N, theta) == legt(N) / theta.
    np.testing.assert_allclose(hippo.legt(5, theta=2.0)[0], hippo.legt(5)[0] / 2, rtol=1e-14)


def test_lagt_reconstructs_exponentially_weighted_history():
    g = lambda t: np.sin(0.5 * t) + 0.3 * np.cos(0.2 * t)
    errs = []
    for N in (4, 8, 16):
        c, t = _online_lti(*hippo.lagt(N), g, 1e-3, 30.0)
        x = np.linspace(0, 5, 400)
        rec = sum(c[n] * eval_laguerre(n, x) for n in range(N))
        errs.append(np.sqrt(np.mean((rec - g(t - x)) ** 2)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs  # measured 2.4e-2, 1.4e-3, 1.9e-6


def test_fout_reconstructs_window_interior():
    """A non-periodic signal has an O(1/N) Fourier error; check it falls in the window interior."""
    f = lambda t: np.sin(3 * t) + 0.5 * np.cos(7 * t)
    errs = []
    for N in (9, 17, 33):
        c, t = _online_lti(*hippo.fout(N), f, 1e-3, 3.0)
        s = t - 1 + (np.arange(500) + 0.5) / 500
        err = hippo.fourier_basis(N, s - t + 1) @ c - f(s)
        errs.append(np.sqrt(np.mean(err[50:450] ** 2)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02, errs  # measured 0.047, 0.032, 0.015


def test_discretize_closed_forms():
    a = np.array([-0.5, -2.0, 0.0])
    A, B, dt = np.diag(a), np.array([1.0, 2.0, 3.0]), 0.3
    Ad, Bd = hippo.discretize(A, B, dt, "zoh")
    np.testing.assert_allclose(np.diag(Ad), np.exp(dt * a), rtol=1e-13)
    # (exp(dt a) - 1) / a b, with the limit dt b at a = 0 (singular A handled).
    np.testing.assert_allclose(Bd, [(np.exp(-0.15) - 1) / -0.5, (np.exp(-0.6) - 1) / -2.0 * 2, 0.9], rtol=1e-13)
    A, B = hippo.legs(6)
    Ad, Bd = hippo.discretize(A, B, dt, "zoh")
    np.testing.assert_allclose(Ad, scipy.linalg.expm(dt * A), rtol=1e-12, atol=1e-14)  # (the zero upper triangle: round-off)
    np.testing.assert_allclose(Bd, np.linalg.solve(A, (Ad - np.eye(6)) @ B), rtol=1e-10)
    Ad, Bd = hippo.discretize(A, B[:, None], dt, "bilinear")
    lhs = np.eye(6) - dt / 2 * A
    np.testing.assert_allclose(Ad, np.linalg.inv(lhs) @ (np.eye(6) + dt / 2 * A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(Bd[:, 0], np.linalg.inv(lhs) @ (dt * B), rtol=1e-12)
    np.testing.assert_allclose(hippo.discretize(A, B, dt, "forward_euler")[0], np.eye(6) + dt * A)
    np.testing.assert_allclose(hippo.discretize(A, B, dt, "backward_euler")[0], np.linalg.inv(np.eye(6) - dt * A),
                               rtol=1e-12, atol=1e-14)


def test_s4d_initialisers():
    N = 8
    w = hippo.s4d_legs(N)
    S, P, _ = hippo.legs_nplr(2 * N)
    A, _ = hippo.legs(2 * N)
    np.testing.assert_allclose(S - np.outer(P, P), A, atol=1e-12)  # NPLR: A = S - P P^T
    np.testing.assert_allclose(S + S.T, -np.eye(2 * N), atol=1e-12)  # S = -I/2 + skew
    eig = np.linalg.eigvals(S)
    np.testing.assert_allclose(np.sort(eig.imag[eig.imag > 0]), w.imag, rtol=1e-10)
    np.testing.assert_allclose(w.real, -0.5)
    assert w.shape == (N,) and np.all(np.diff(w.imag) > 0)
    np.testing.assert_allclose(hippo.s4d_lin(N), -0.5 + 1j * np.pi * np.arange(N))
    inv = hippo.s4d_inv(N)
    np.testing.assert_allclose(inv, -0.5 + 1j * (2 * N / np.pi) * (2 * N / (2 * np.arange(N) + 1) - 1))
    # S4D-Inv is a closed-form approximation of S4D-LegS's spectrum (within ~30% per mode).
    ratio = inv.imag[::-1] / w.imag
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


@pytest.mark.parametrize("call,match", [
    (lambda: hippo.legs(0), "N must be"),
    (lambda: hippo.legt(4, theta=0.0), "theta"),
    (lambda: hippo.s4d_lin(2.5), "N must be"),
    (lambda: hippo.discretize(np.eye(3), np.ones(3), 0.1, "rk4"), "method"),
    (lambda: hippo.discretize(np.ones((3, 2)), np.ones(3), 0.1), "A must be"),
    (lambda: hippo.discretize(np.eye(3), np.ones(2), 0.1), "B must be"),
    (lambda: hippo.discretize(np.eye(3), np.ones(3), -1.0), "dt must be"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
