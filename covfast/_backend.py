"""The one place that decides which implementation runs each op: C++ (``covfast._C``), CUDA (``covfast._cuda``),
Triton (``covfast.kernels``) or the pure-torch reference.

Op modules register their implementations with :func:`register`; the op bodies call :func:`dispatch`. The choice
is made once per (op, device type) and cached. Automatic order: on CPU ``cpp`` then ``reference``; on CUDA
``cuda``, ``triton``, then ``reference``. Triton also runs on CPU tensors under ``TRITON_INTERPRET=1`` (for tests)
but is never picked there automatically because the interpreter is slow.

``COVFAST_BACKEND=reference|cpp|cuda|triton`` overrides the order: the named backend runs every op it implements
for the tensor's device; other ops keep the automatic choice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator

BACKENDS = ("reference", "cpp", "cuda", "triton")
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

# (op, backend) -> (implementation, device types it accepts)
_IMPLS: dict[tuple[str, str], tuple[Callable, tuple[str, ...]]] = {}
_forced: str | None = None


def register(op: str, backend: str, device_types: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator that registers ``fn`` as the ``backend`` implementation of ``op`` for ``device_types``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = (fn, device_types)
        select.cache_clear()
        return fn

    return wrap


@functools.cache
def _probe(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, "pure torch, always available"
    if backend == "cpp":
        try:
            c_ext = importlib.import_module("covfast._C")
        except ImportError as exc:
            return False, f"covfast._C not importable ({exc})"
        return True, f"covfast._C with {c_ext.openmp_max_threads()} OpenMP threads"
    if backend == "cuda":
        try:
            cuda_ext = importlib.import_module("covfast._cuda")
        except ImportError as exc:
            return False, f"covfast._cuda not built or not importable ({exc})"
        if cuda_ext.device_count() == 0:
            return False, "covfast._cuda built, but no CUDA device is visible"
        return True, f"covfast._cuda, CUDA runtime {cuda_ext.runtime_version()}"
    if backend == "triton":
        try:
            triton = importlib.import_module("triton")
        except ImportError as exc:
            return False, f"triton not installed ({exc})"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return device_type == "cpu", f"triton {triton.__version__} in interpreter mode (CPU tensors only)"
        import torch

        if not torch.cuda.is_available():
            return False, f"triton {triton.__version__} installed, but no CUDA device"
        return device_type == "cuda", f"triton {triton.__version__} on CUDA"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def cuda_extension():
    """``covfast._cuda``, or a clear error where it is not built or no GPU is visible."""
    ok, reason = _probe("cuda", "cuda")
    if not ok:
        raise RuntimeError(f"the CUDA backend cannot run: {reason}")
    return importlib.import_module("covfast._cuda")


FLOAT_TYPES = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}  # covfast::FloatType codes


def float_type(dtype) -> int:
    """The covfast::FloatType code of a torch dtype the CUDA kernels take (float32, float16, bfloat16)."""
    try:
        return FLOAT_TYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"the CUDA kernels take float32, float16 or bfloat16, not {dtype}") from None


def stream_handle(device) -> int:
    """The caller's current CUDA stream on ``device``, as the integer handle the bindings take."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def available_backends() -> dict[str, tuple[bool, str]]:
    """Which backends can run on this machine, for ``covfast info``.

    Returns:
        backend name -> (available, reason). ``triton`` is reported for CUDA devices, or for CPU in interpreter mode.
    """
    result = {}
    for backend in BACKENDS:
        ok, reason = _probe(backend, "cuda")
        if not ok and backend == "triton":
            ok, reason = _probe(backend, "cpu")
        if backend == "cpp":
            ok, reason = _probe(backend, "cpu")
        result[backend] = (ok, reason)
    return result


def _requested() -> str | None:
    name = _forced or os.environ.get("COVFAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"COVFAST_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def _usable(op: str, backend: str, device_type: str) -> bool:
    entry = _IMPLS.get((op, backend))
    return entry is not None and device_type in entry[1] and _probe(backend, device_type)[0]


@functools.cache
def select(op: str, device_type: str) -> str:
    """Name of the backend that runs ``op`` on tensors of ``device_type`` ('cpu', 'cuda', ...)."""
    requested = _requested()
    if requested is not None:
        if _usable(op, requested, device_type):
            return requested
        if not any(_probe(requested, dev)[0] for dev in _AUTO_ORDER):
            warnings.warn(
                f"COVFAST_BACKEND={requested} is unavailable ({_probe(requested, device_type)[1]}); "
                "using the automatic choice",
                RuntimeWarning,
                stacklevel=3,
            )
    for backend in _AUTO_ORDER.get(device_type, ("reference",)):
        if _usable(op, backend, device_type):
            return backend
    return "reference"


def implementation(op: str, backend: str) -> Callable:
    """The registered ``backend`` implementation of ``op`` (for tests and benchmarks that pin a backend)."""
    importlib.import_module("covfast.ops")  # the op modules register their implementations on import
    try:
        return _IMPLS[(op, backend)][0]
    except KeyError:
        raise NotImplementedError(f"op {op!r} has no {backend!r} implementation") from None


def dispatch(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` chosen by :func:`select` for ``device_type``."""
    return implementation(op, select(op, device_type))


def runs_eagerly(*tensors) -> bool:
    """Whether an op call on ``tensors`` may run its implementation directly instead of through ``torch.ops``.

    True for plain tensors that need no gradient, outside ``torch.compile`` / ``torch.export`` tracing and functorch
    transforms: then the custom op's machinery only adds cost, chiefly its first call, which imports ``torch._dynamo``
    (about 1.1-1.4 s on the 2-core CPU, with triton behind it) in a ``covfast infer`` run that otherwise never needs
    it. Everything else (autograd, fake and functional tensors of tracing, ONNX export, opcheck) goes through the op.
    """
    import torch

    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or torch._C._functorch.is_functorch_wrapped_tensor(
            tensor
        ):
            return False
        if grad and tensor.requires_grad:
            return False
    return True


def call(body: Callable, op: Callable, *args):
    """Run an op: ``body(*args)`` (the function registered as the custom op ``op``) when :func:`runs_eagerly` holds
    for the tensor arguments, else ``op(*args)`` through ``torch.ops``."""
    import torch

    if runs_eagerly(*(arg for arg in args if isinstance(arg, torch.Tensor))):
        return body(*args)
    return op(*args)


def selected_backends(device_type: str) -> dict[str, str]:
    """op -> backend that runs it on ``device_type``, for reports."""
    importlib.import_module("covfast.ops")
    return {op: select(op, device_type) for op in sorted({op for op, _ in _IMPLS})}


@contextlib.contextmanager
def forced(backend: str | None) -> Iterator[None]:
    """Temporarily behave as if ``COVFAST_BACKEND=backend`` (``None``: automatic choice)."""
    global _forced
    previous, _forced = _forced, backend
    select.cache_clear()
    try:
        yield
    finally:
        _forced = previous
        select.cache_clear()
