"""HiPPO transition matrices, their discretisation, and the S4D diagonal initialisers.

HiPPO (Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections") keeps
``c(t) in R^N``, the coefficients of the projection of the input history ``f(s), s <= t`` onto
``N`` orthonormal functions under a measure ``mu_t``; ``c`` obeys a linear ODE. Every function
here returns ``(A, B)`` as float64 NumPy arrays, ``A: [N, N]``, ``B: [N]``, in the convention in
which the ODE reads ``dc/dt = A c + B f`` (the transition is returned already negated, as in the
S4 code's ``transition(measure, N)``):

============  ===============================  ==========================================================
measure       ODE                              reconstruction of the history from ``c(t)``
============  ===============================  ==========================================================
``legs``      ``dc/dt = (1/t) (A c + B f)``     ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s / t - 1)``, ``s in [0, t]``
``legt``      ``dc/dt = A c + B f``             ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 (s - t) / theta + 1)``, ``s in [t - theta, t]``
``lagt``      ``dc/dt = A c + B f``             ``f(t - x) ~ sum_n c_n L_n(x)``, ``x >= 0`` (weight ``e^{-x}``)
``fout``      ``dc/dt = A c + B f``             ``f(s) ~ sum_n c_n phi_n((s - t) / theta + 1)``, ``s in [t - theta, t]``
============  ===============================  ==========================================================

(``P_n``: Legendre polynomials on ``[-1, 1]``; ``L_n``: Laguerre polynomials; ``phi``: the
Fourier basis ``1, sqrt2 cos(2 pi x), sqrt2 sin(2 pi x), sqrt2 cos(4 pi x), ...`` on ``[0, 1]``.)

The S4D initialisers return ``N`` complex eigenvalues (continuous time, real part ``-1/2``) for a
diagonal SSM such as :func:`memjax.memory.ssm.diagonal_ssm`. Following the S4D code, each returned
mode stands for a complex-conjugate pair of a real system of size ``2N``; the output
``y = Re(sum_n C_n h_n)`` takes the real part, and the factor 2 of the pair is absorbed into ``C``.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

METHODS = ("zoh", "bilinear", "forward_euler", "backward_euler")


def _check_n(fn: str, N) -> int:
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N <= 0:
        raise ValueError(f"{fn}: N must be a positive int, got {N!r}")
    return int(N)


def legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS (scaled Legendre, uniform measure on ``[0, t]``), transition already negated.

    ``A_nk = -sqrt(2n+1) sqrt(2k+1)`` for ``n > k``, ``-(n + 1)`` for ``n = k``, ``0`` for ``n < k``;
    ``B_n = sqrt(2n+1)``; the ODE is ``dc/dt = (1/t) (A c + B f)`` (scale invariant).
    Returns ``A: [N, N]`` (lower triangular), ``B: [N]``, float64.
    """
    N = _check_n("legs", N)
    r = np.sqrt(2.0 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(N) + 1.0)
    return A, r.copy()


def legt(N: int, theta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegT (translated Legendre, uniform measure on the window ``[t - theta, t]``).

    With ``lambda_n = sqrt(2n+1)``: ``A_nk = -(1/theta) lambda_n lambda_k`` for ``n > k`` and
    ``-(1/theta) (-1)^(n-k) lambda_n lambda_k`` for ``n <= k``; ``B_n = lambda_n / theta``. The ODE is
    ``dc/dt = A c + B f``; the value leaving the window, ``f(t - theta)``, is approximated by the
    projection itself (the HiPPO derivation). ``theta = 1`` by default: the memory covers one time
    unit, so with a step ``dt`` the window is ``1 / dt`` samples. (The S4 code's
    ``transition('legt', N)`` includes an extra factor 1/2, i.e. it equals ``legt(N, theta=2)``.)
    """
    N = _check_n("legt", N)
    if not theta > 0:
        raise ValueError(f"legt: theta must be > 0, got {theta!r}")
    n = np.arange(N)
    r = np.sqrt(2.0 * n + 1.0)
    sign = np.where(n[:, None] > n[None, :], 1.0, (-1.0) ** np.abs(n[:, None] - n[None, :]))
    return -sign * np.outer(r, r) / theta, r / theta


def lagt(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LagT (translated Laguerre, exponentially decaying measure ``e^{-(t - s)}``).

    ``A = -tril(ones)`` (``A_nk = -1`` for ``n >= k``), ``B_n = 1``; ``dc/dt = A c + B f`` and
    ``f(t - x) ~ sum_n c_n L_n(x)``. (The S4 code's ``transition('lagt', N)`` adds ``I / 2``, which
    corresponds to the tilted basis ``L_n(x) e^{-x/2}``.)
    """
    N = _check_n("lagt", N)
    return -np.tril(np.ones((N, N))), np.ones(N)


def fout(N: int, theta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-FouT (translated Fourier, uniform measure on ``[t - theta, t]``).

    Basis on ``x = (s - t) / theta + 1 in [0, 1]``: ``phi_0 = 1``, ``phi_{2m-1} = sqrt2 cos(2 pi m x)``,
    ``phi_{2m} = sqrt2 sin(2 pi m x)`` (:func:`fourier_basis`). With ``e = phi(0) = phi(1)``
    (``1, sqrt2, 0, sqrt2, 0, ...``): ``A = (1/theta) (Omega - 2 e e^T)``, ``B = 2 e / theta``, where
    ``Omega`` couples each cos/sin pair, ``Omega[cos_m, sin_m] = 2 pi m = -Omega[sin_m, cos_m]``.

    Why the 2: ``dc/dt`` involves ``f(t) - f(t - theta)``, and the truncated Fourier series at the
    window's edge converges to the average ``(f(t) + f(t - theta)) / 2`` (the periodic extension
    jumps there), so ``f(t - theta) ~ 2 e^T c - f(t)``. These are the entries of the HiPPO paper
    (``-2``, ``-2 sqrt2``, ``-4``, ``2 pi n``; ``B = 2, 2 sqrt2``). The S4 code's
    ``transition('fourier', N)`` uses ``e e^T`` and ``B = e`` instead.
    """
    N = _check_n("fout", N)
    if not theta > 0:
        raise ValueError(f"fout: theta must be > 0, got {theta!r}")
    e = np.zeros(N)
    e[0] = 1.0
    e[1::2] = np.sqrt(2.0)
    omega = np.zeros((N, N))
    for m in range(1, N // 2 + 1):
        c, s = 2 * m - 1, 2 * m
        if s < N:
            omega[c, s] = 2 * np.pi * m
            omega[s, c] = -2 * np.pi * m
    return (omega - 2.0 * np.outer(e, e)) / theta, 2.0 * e / theta


def fourier_basis(N: int, x: np.ndarray) -> np.ndarray:
    """``phi_n(x)`` of :func:`fout` at points ``x`` (any shape): returns ``[..., N]``."""
    N = _check_n("fourier_basis", N)
    x = np.asarray(x, np.float64)[..., None]
    n = np.arange(N)
    m = (n + 1) // 2
    out = np.where(n % 2 == 1, np.sqrt(2.0) * np.cos(2 * np.pi * m * x), np.sqrt(2.0) * np.sin(2 * np.pi * m * x))
    return np.where(n == 0, 1.0, out)


def discretize(A, B, dt: float, method: str = "zoh") -> tuple[np.ndarray, np.ndarray]:
    """Discretise ``dc/dt = A c + B f`` with step ``dt`` (input held over the step).

    Returns ``(Ad, Bd)`` with ``c_{k+1} = Ad c_k + Bd f_k``:

    - ``"zoh"``: ``Ad = exp(dt A)``, ``Bd = A^{-1} (Ad - I) B`` (computed as one block matrix
      exponential, so a singular ``A`` is fine);
    - ``"bilinear"`` (Tustin / GBT with alpha = 1/2, what HiPPO and S4 use):
      ``Ad = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``Bd = (I - dt/2 A)^{-1} dt B``;
    - ``"forward_euler"``: ``Ad = I + dt A``, ``Bd = dt B``;
    - ``"backward_euler"``: ``Ad = (I - dt A)^{-1}``, ``Bd = (I - dt A)^{-1} dt B``.

    For LegS (``dc/dt = (1/t)(A c + B f)``) discretise at step ``k`` with ``dt = 1/k`` (HiPPO).

    Args: ``A: [N, N]``, ``B: [N]`` or ``[N, M]``, ``dt > 0`` scalar. Float64 NumPy in and out.
    """
    if method not in METHODS:
        raise ValueError(f"discretize: method must be one of {METHODS}, got {method!r}")
    A = np.asarray(A, np.float64) if not np.iscomplexobj(A) else np.asarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"discretize: A must be a square matrix [N, N], got shape {A.shape}")
    N = A.shape[0]
    B = np.asarray(B)
    if B.ndim not in (1, 2) or B.shape[0] != N:
        raise ValueError(f"discretize: B must be [N] or [N, M] with N = {N}, got shape {B.shape}")
    if np.ndim(dt) != 0 or not float(dt) > 0:
        raise ValueError(f"discretize: dt must be a positive scalar, got {dt!r}")
    vec = B.ndim == 1
    B2 = B[:, None] if vec else B
    eye = np.eye(N)
    if method == "zoh":
        M = B2.shape[1]
        big = np.zeros((N + M, N + M), np.result_type(A, B2))
        big[:N, :N] = A * dt
        big[:N, N:] = B2 * dt
        E = scipy.linalg.expm(big)
        Ad, Bd = E[:N, :N], E[:N, N:]
    elif method == "bilinear":
        lhs = eye - dt / 2 * A
        Ad = np.linalg.solve(lhs, eye + dt / 2 * A)
        Bd = np.linalg.solve(lhs, dt * B2)
    elif method == "forward_euler":
        Ad, Bd = eye + dt * A, dt * B2
    else:
        lhs = eye - dt * A
        Ad = np.linalg.solve(lhs, eye)
        Bd = np.linalg.solve(lhs, dt * B2)
    return Ad, (Bd[:, 0] if vec else Bd)


# ----------------------------------------------------------------------------- S4D initialisers


def legs_nplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal-plus-low-rank split of LegS: ``A = S - P P^T`` with ``P_n = sqrt(n + 1/2)``.

    ``S = A + P P^T`` is normal: ``-1/2`` on the diagonal plus a skew-symmetric part
    (``S_nk = -1/2 sqrt(2n+1) sqrt(2k+1)`` for ``n > k``, ``+...`` for ``n < k``).
    Returns ``(S [N, N], P [N], B [N])`` (Gu et al. 2022, S4).
    """
    A, B = legs(N)
    P = np.sqrt(np.arange(N) + 0.5)
    return A + np.outer(P, P), P, B


def s4d_legs(N: int) -> np.ndarray:
    """S4D-LegS: the eigenvalues of the normal part of LegS (Gu et al. 2022, "On the
    Parameterization and Initialization of Diagonal State Space Models").

    The normal part ``S`` of the LegS NPLR decomposition of size ``2N`` is ``-1/2 I + J`` with ``J``
    real skew-symmetric, so its eigenvalues are ``-1/2 + i omega`` in conjugate pairs, where
    ``i omega`` are the eigenvalues of ``J`` (computed from the Hermitian ``-i J`` with ``eigh``).
    Returns the ``N`` with ``omega > 0`` (one per conjugate pair), sorted by ``omega``: ``[N] complex128``.
    """
    N = _check_n("s4d_legs", N)
    S, _, _ = legs_nplr(2 * N)
    J = S + 0.5 * np.eye(2 * N)
    omega = np.linalg.eigvalsh(-1j * J)  # real, ascending; +-pairs since J is real skew-symmetric
    return -0.5 + 1j * np.sort(omega)[N:]


def s4d_lin(N: int) -> np.ndarray:
    """S4D-Lin: ``A_n = -1/2 + i pi n``, ``n = 0..N-1`` (frequencies of a Fourier basis, the
    diagonal approximation of FouT). ``[N] complex128``."""
    N = _check_n("s4d_lin", N)
    return -0.5 + 1j * np.pi * np.arange(N)


def s4d_inv(N: int) -> np.ndarray:
    """S4D-Inv: ``A_n = -1/2 + i (M / pi) (M / (2n + 1) - 1)``, ``n = 0..N-1``, ``M = 2N`` the real
    state size (the S4D code's convention; the imaginary parts follow the inverse law that
    approximates S4D-LegS's spectrum). ``[N] complex128``."""
    N = _check_n("s4d_inv", N)
    M = 2 * N
    return -0.5 + 1j * (M / np.pi) * (M / (2 * np.arange(N) + 1.0) - 1.0)


S4D_INITS = {"legs": s4d_legs, "lin": s4d_lin, "inv": s4d_inv}
