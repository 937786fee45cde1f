"""Special functions for the compiled kernels: SciPy's own implementations (``scipy.special.cython_special``),
called from numba through their C entry points — no home-made approximations.

They are registered with LLVM under fixed symbol names and declared as external functions, so
compiled kernels refer to them by name and numba can cache those kernels on disk (a ctypes pointer
would be baked into the code and forbid caching).

>>> from sensorwatch.scoring.components.special import ZEQ_MAX, gammaincc_py, ndtri_py
>>> round(ndtri_py(0.975), 6), round(gammaincc_py(0.5, 2.0), 6), round(ZEQ_MAX, 4)
(1.959964, 0.0455, 37.0471)
"""

from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
from numba import types
from numba.extending import get_cython_function_address

_MODULE = "scipy.special.cython_special"
_D = ctypes.c_double


def _register(symbol: str, name: str, arity: int) -> tuple[types.ExternalFunction, ctypes._CFuncPtr]:
    address = get_cython_function_address(_MODULE, name)
    llvm.add_symbol(symbol, address)
    sig = types.float64(*([types.float64] * arity))
    return types.ExternalFunction(symbol, sig), ctypes.CFUNCTYPE(_D, *([_D] * arity))(address)


#: log Φ(x), accurate far into the lower tail (the double, not complex, specialisation).
log_ndtr, log_ndtr_py = _register("sensorwatch_log_ndtr", "__pyx_fuse_1log_ndtr", 1)
#: Φ⁻¹(p).
ndtri, ndtri_py = _register("sensorwatch_ndtri", "ndtri", 1)
#: Regularised upper incomplete gamma Q(a, x) (χ²_k tail of s: Q(k/2, s/2)).
gammaincc, gammaincc_py = _register("sensorwatch_gammaincc", "gammaincc", 2)
#: Smallest tail probability the raw score inverts (below it z is capped): 1e-300.
TAIL_MIN = 1e-300
#: −Φ⁻¹(TAIL_MIN): the largest equivalent |z| of a raw score (≈ 37.05).
ZEQ_MAX = -ndtri_py(TAIL_MIN)
