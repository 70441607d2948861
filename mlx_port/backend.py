"""Importing MLX (and mlx-whisper) with a clear message when they are missing, and a faster BLAS on Linux CPUs.

Every module of the port that needs MLX goes through `import_mlx()`, so `import lite_whisper.mlx_port` works without
MLX installed and the first real use fails with the name of the extra to install.

Why the BLAS step: the Linux `mlx-cpu` wheels (0.32 at the time of writing) link the netlib *reference* BLAS, whose
single-threaded `cblas_sgemm` runs at a few GFLOP/s; Whisper's encoder is matrix products throughout, so a
whisper-base forward pass takes about half a minute on a 2-core x86 machine. MLX resolves `cblas_sgemm` through the
dynamic linker, so loading an OpenBLAS library with RTLD_GLOBAL *before* MLX is first imported makes MLX use it
(20x faster here, same results up to summation order). On macOS MLX uses Accelerate and the Metal GPU; nothing is
done there.
"""

import ctypes
import ctypes.util
import os
import sys

from lite_whisper.utils import get_logger, install_command

logger = get_logger(__name__)

MLX_INSTALL_HINT = f'the MLX port needs the "mlx" extra (MLX, and mlx[cpu] on Linux): {install_command("mlx")}'

# Environment variable choosing the BLAS that MLX's CPU backend uses on Linux: "auto" (default: a system OpenBLAS
# if one is installed, e.g. Debian's libopenblas0-pthread), "off" (keep the wheel's reference BLAS), or a path.
BLAS_ENV = "LITE_WHISPER_MLX_BLAS"

_BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_state = {"done": False, "library": None}


class MLXUnavailableError(ImportError):
    pass


def _find_openblas():
    for path in _BLAS_CANDIDATES:
        if os.path.isfile(path):
            return path
    name = ctypes.util.find_library("openblas")
    return name


def preload_blas():
    """Load a system OpenBLAS globally so that MLX's CPU backend binds to it; a no-op once MLX is imported.

    Returns the library loaded, or None. Only acts on Linux, and only before the first `import mlx.core`.
    """
    if _blas_state["done"]:
        return _blas_state["library"]
    _blas_state["done"] = True
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get(BLAS_ENV, "auto").strip()
    if choice.lower() in ("off", "0", "no", "none", "false"):
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX's symbols are already bound. Harmless, only slower.
        logger.debug("mlx.core was imported before lite_whisper.mlx_port; keeping the BLAS it bound to")
        return None
    path = _find_openblas() if choice.lower() == "auto" else choice
    if not path:
        # A warning, not info: without OpenBLAS a few seconds of audio take minutes, and the fix is one command.
        logger.warning(
            "MLX on this Linux CPU uses the slow reference BLAS of its wheel (no OpenBLAS found): expect about 20x "
            "slower inference. Install OpenBLAS (sudo apt-get install libopenblas0-pthread on Debian/Ubuntu) or point "
            f"{BLAS_ENV} at a libopenblas.so; {BLAS_ENV}=off silences this"
        )
        return None
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if not hasattr(library, "cblas_sgemm"):
            raise OSError("it has no cblas_sgemm")
    except OSError as error:
        logger.warning(f"could not use {path} as MLX's BLAS ({error}); keeping the reference BLAS")
        return None
    _blas_state["library"] = path
    logger.info(f"MLX CPU backend: using {path} for matrix products")
    return path


def import_mlx():
    """(mlx.core, mlx.nn), raising MLXUnavailableError naming the extra when MLX or mlx-whisper is missing."""
    preload_blas()
    try:
        import mlx.core as mx
        import mlx.nn as nn
    except ImportError as error:
        raise MLXUnavailableError(f"{MLX_INSTALL_HINT} ({error})") from error
    try:
        import mlx_whisper  # noqa: F401  (decoder, decoding and transcribe come from mlx-whisper)
    except ImportError as error:
        raise MLXUnavailableError(f"{MLX_INSTALL_HINT}; mlx-whisper is missing ({error})") from error
    return mx, nn


__all__ = ["BLAS_ENV", "MLX_INSTALL_HINT", "MLXUnavailableError", "import_mlx", "preload_blas"]
