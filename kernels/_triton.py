"""Where a kernel runs: compiled on CUDA, interpreted on CPU, or not at all (torch reference).

Triton decides between compiling and interpreting when ``@triton.jit`` runs, i.e. at import time
(``TRITON_INTERPRET``). That makes the choice depend on which test imported what first, so every
qoqopt kernel is wrapped in :class:`Kernel`, which builds the compiled or the interpreted variant
lazily and picks one per launch from the device of the tensors. The interpreter is only used when
``TRITON_INTERPRET=1`` is set when the op is called: it is a correctness tool (~0.05 GB/s), never a
silent production path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings

import torch

try:  # triton is an optional extra (qoqopt[kernels]); without it every op runs its torch reference
    import triton
    import triton.language as tl
    from triton.runtime.driver import driver as _DRIVER  # the active backend's, as the dispatch asks it

    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    HAS_TRITON = False

    class _Constexpr:
        """Stands in for ``tl.constexpr``, as an annotation and as a module-level value."""

        def __init__(self, value=None):
            self.value = value

    class _LanguageStub:
        """Lets kernel signatures (``BLOCK: tl.constexpr``) and constants evaluate when triton is absent."""

        constexpr = _Constexpr

    tl = _LanguageStub()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEFAULT_STAGES = 3  # Triton's num_stages on CUDA when a launch names none


class Kernel:
    """A Triton kernel launched as ``kernel[device][grid](...)``.

    Triton launches on its driver's current device, not on the tensors' one: a model split over GPUs
    (``device_map``) would have a layer on cuda:1 launched on cuda:0 with cuda:1 addresses. So a CUDA
    variant is per GPU index and launches there, setting the current device around the launch only
    where it differs.
    """

    def __init__(self, fn, do_not_specialize: tuple[str, ...] = ()):
        self.fn = fn
        self.do_not_specialize = do_not_specialize
        self._variants: dict[str | int | None, object] = {}  # "interpret", or a GPU index (None: the current)

    def __getitem__(self, device: torch.device):
        if device.type == "cpu":
            if "interpret" not in self._variants:
                self._variants["interpret"] = _Interpreted(self.fn)
            return self._variants["interpret"]
        if None not in self._variants:
            self._variants[None] = _Compiled(_compiled(self.fn, self.do_not_specialize))
        if device.index not in self._variants:  # one JIT function (and compile cache) for every GPU
            self._variants[device.index] = self._variants[None].on(device.index)
        return self._variants[device.index]


class _Compiled:
    """The compiled variant, with FP fusion asked for explicitly: the kernels are written for FFMA
    (dequant, RoPE, the folded softmax scale) and Triton 3.10 turns the default off.

    The default tiles are tuned on Hopper (227 KB of shared memory per block); a GPU with less (an
    RTX 4090 or L4: 99 KB) gets the same tiles with fewer pipeline stages: a launch that Triton
    refuses for shared memory is retried one stage shallower, down to one, and the depth that fitted
    is remembered per device, argument dtypes and config.
    """

    def __init__(self, jit_fn, device: int | None = None, fitted_stages: dict | None = None):
        self.fn = jit_fn
        self.device = device  # the GPU index launches go to; None: whichever is current
        # (device, dtypes, constexprs and options) -> stages run; one dict shared by every GPU's variant
        self.fitted_stages: dict[tuple, int] = {} if fitted_stages is None else fitted_stages

    def on(self, device: int | None) -> "_Compiled":
        """This kernel launched on GPU ``device`` whatever the current device is."""
        return _Compiled(self.fn, device, self.fitted_stages)

    def __getitem__(self, grid):
        launcher = self.fn[grid]

        def launch(*args, **asked):
            if self.device is not None and _current_device() != self.device:
                return _on_device(self.device, launch, *args, **asked)
            kwargs, key = asked, None
            if self.fitted_stages:  # empty unless a launch did not fit: only then is each launch keyed (~3 us)
                key = _config_key(args, asked)
                if key in self.fitted_stages:
                    kwargs = asked | {"num_stages": self.fitted_stages[key]}
            while True:
                try:
                    return launcher(*args, enable_fp_fusion=True, **kwargs)
                except OutOfResources as err:  # raised before anything runs on the device
                    stages = kwargs.get("num_stages", _DEFAULT_STAGES)
                    if stages <= 1 or err.name != "shared memory":
                        raise
                    key = key or _config_key(args, asked)
                    self.fitted_stages[key] = stages - 1
                    kwargs = asked | {"num_stages": stages - 1}

        return launch

    def bind(self, grid, constexprs: dict) -> "BoundLaunch":
        return BoundLaunch(self, grid, constexprs)


class BoundLaunch:
    """``kernel[grid](*args, **constexprs)`` for one grid and constexpr set, launched many times.

    Triton's dispatch binds and specialises every argument and hashes a cache key at each launch:
    13-14 us of Python on the CI machine's CPU under Triton 3.6 and 3.9, against under 1 us for the
    compiled kernel's own ``kernel[grid]`` runner (``benchmarks/bench_host_cost.py``, stub driver).
    A decode step makes 7 W4A16 launches per layer. So the first call goes through the dispatch
    (which compiles if need be), and later calls whose arguments Triton would specialise the same
    way go straight to the compiled kernel: the same runner, with the same argument list (runtime
    arguments, then the constexprs in signature order) that the dispatch passes it. Anything that
    could change the specialisation (a tensor's dtype or 16-byte alignment, a scalar's type or value,
    the current device) sends the call through the dispatch again, which rebinds. The runner reads
    the current stream and Triton's launch hooks at each call, as the dispatch does; what a direct
    launch does not see is a change of Triton's debug and instrumentation knobs, or its pre-run
    hooks, after the first call.
    """

    def __init__(self, variant: _Compiled, grid, constexprs: dict):
        self.variant, self.grid, self.constexprs = variant, grid, constexprs
        self.kernel = None  # the compiled kernel bound (for inspection)
        # (signature, runner, trailing constexprs), replaced whole: every layer of a shape shares this
        # launch, so a call on another thread never pairs one binding's runner with another's signature
        self.bound: tuple | None = None
        self.dispatches = 0  # calls that went through Triton's dispatch (tests count them)

    def __call__(self, *args) -> None:
        signature, device = [_current_device(), *launch_signature(args)], self.variant.device
        if device is None or signature[0] == device:
            return self._launch(signature, args)
        signature[0] = device
        return _on_device(device, self._launch, signature, args)

    def _launch(self, signature: list, args: tuple) -> None:
        bound = self.bound
        if bound is not None and signature == bound[0]:
            bound[1](*args, *bound[2])
            return
        self.dispatches += 1
        kernel = self.variant[self.grid](*args, **self.constexprs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel  # an async compile's future
        if kernel is None:  # a cache hook took the launch over: nothing to bind
            self.kernel = self.bound = None
            return
        params = self.variant.fn.signature.parameters
        names = list(params)[len(args):]
        tail = tuple(self.constexprs[n] if n in self.constexprs else params[n].default for n in names)
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))  # the runner reads three dimensions
        self.kernel, self.bound = kernel, (signature, kernel[grid], tail)


def _config_key(args: tuple, kwargs: dict) -> tuple:
    """What a launch's shared memory depends on: the device, the tensors' dtypes, the constexprs and options."""
    dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    return (_current_device(), dtypes, *sorted(kwargs.items()))


def _current_device() -> int:
    """The device Triton's dispatch would launch on (its driver's notion, as the dispatch asks it)."""
    return _DRIVER.active.get_current_device()


def _on_device(device: int, launch, *args, **kwargs):
    """``launch(*args, **kwargs)`` with GPU ``device`` current, then the previous one again."""
    previous = _exchange_device(device)
    try:
        return launch(*args, **kwargs)
    finally:
        _restore_device(previous)


def _exchange_device(device: int) -> int:
    """Make GPU ``device`` current (Triton's dispatch reads torch's current device); returns the one
    that was. ``torch.cuda.device`` switches this way too."""
    return torch.cuda._exchange_device(device)


def _restore_device(device: int) -> None:
    """Make GPU ``device`` current again, as ``torch.cuda.device`` does on exit: only where it already
    has a CUDA context. A plain ``set_device`` back would create one (several hundred MB) on a GPU
    the model never uses, e.g. cuda:0 under a model placed wholly on cuda:1."""
    torch.cuda._maybe_exchange_device(device)


def launch_signature(args) -> list:
    """What Triton specialises a launch on, per argument: a tensor's dtype and its address modulo
    16, an int's value (stricter than Triton, which looks at ==1, %16 and the width), or another
    scalar's type and value (True, 1 and 1.0 are equal but compile as i1, i32 and fp32)."""
    return [(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a if type(a) is int else (type(a), a)
            for a in args]  # a list comprehension: faster than a tuple of a generator


class _Interpreted:
    """The interpreted variant, runnable whenever triton was imported.

    triton.language's own helpers (``tl.zeros``, ``tl.sum``, ...) are ``@jit`` functions, built
    compiled-only when triton was imported without TRITON_INTERPRET (transformers imports triton
    early). While an interpreted kernel runs, calls to such helpers are routed through the
    interpreter too; outside that window nothing is changed.
    """

    def __init__(self, fn):
        from triton.runtime.interpreter import InterpretedFunction

        self.fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _helpers_interpretable():
                return self.fn[grid](*args, **kwargs)

        return launch

    def bind(self, grid, constexprs: dict):
        launch = self[grid]
        return lambda *args: launch(*args, **constexprs)


_INTERPRETED_HELPERS: dict = {}


@contextlib.contextmanager
def _helpers_interpretable():
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        if self.fn not in _INTERPRETED_HELPERS:
            _INTERPRETED_HELPERS[self.fn] = InterpretedFunction(self.fn).rewrite()
        # As InterpretedFunction.__call__, but undoing its patches of triton.language afterwards:
        # left in place they break later compiled launches in the same process.
        scope = _patch_lang(self.fn)
        try:
            return _INTERPRETED_HELPERS[self.fn](*args, **kwargs)
        finally:
            scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def kernel(fn=None, *, do_not_specialize: tuple[str, ...] = ()):
    """Decorator: ``@kernel`` or ``@kernel(do_not_specialize=("M",))``.

    Integer arguments used only in masks (the row count M) are worth not specialising: Triton would
    otherwise compile a variant per class of value (1, multiple of 16, other).
    """
    if fn is None:
        return lambda f: Kernel(f, do_not_specialize)
    return Kernel(fn, do_not_specialize)


def device_function(fn):
    """A ``@triton.jit`` helper called from kernels (routed through the interpreter on the CPU)."""
    return _compiled(fn) if HAS_TRITON else fn


def _compiled(fn, do_not_specialize: tuple[str, ...] = ()):
    # Not triton.jit: that returns an interpreted function whenever TRITON_INTERPRET is set at
    # decoration time, which would then fail to compile for CUDA later in the same process.
    from triton.runtime.jit import JITFunction

    return JITFunction(fn, do_not_specialize=do_not_specialize or None)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton path cannot run for tensors on ``device`` in ``dtype``; None when it can.

    Unsupported devices and dtypes are not in this list: :func:`check_supported` refuses those.
    """
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cpu":
        if not interpreter_enabled():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if dtype == torch.bfloat16:
            return "the Triton CPU interpreter has no bf16 (a bf16 tl.dot returns garbage)"
    elif device.type == "cuda":
        if not _has_build_impl():
            reason = _no_c_compiler_reason(os.environ.get("CC"))
            if reason is not None:
                return reason
        if dtype == torch.bfloat16:
            return _bf16_unusable_reason(device.index if device.index is not None else torch.cuda.current_device())
    return None


def _has_build_impl() -> bool:
    """A build function given to Triton (``triton.knobs.build.impl``) stands in for the C compiler."""
    return getattr(getattr(getattr(triton, "knobs", None), "build", None), "impl", None) is not None


@functools.lru_cache(maxsize=4)  # asked at every launch; keyed on $CC, PATH is read once
def _no_c_compiler_reason(cc: str | None) -> str | None:
    """Triton builds its CUDA driver glue and each kernel's launcher with the host's C compiler, the
    way it finds one: $CC, else gcc, else clang. A CUDA runtime image without one (nvidia/cuda
    *-runtime has none) got Triton's "Failed to find C compiler" traceback at the first forward."""
    if cc or shutil.which("gcc") or shutil.which("clang"):
        return None
    return "Triton needs a C compiler for its CUDA launchers and finds none (no $CC, gcc or clang): install gcc, or set CC"


BF16_MIN_CAPABILITY = (8, 0)  # ptxas refuses the decode kernel's bf16x2 FMAs below sm_80 (Ampere)


@functools.lru_cache(maxsize=None)  # asked at every launch; a GPU's capability does not change
def _bf16_unusable_reason(index: int) -> str | None:
    capability = torch.cuda.get_device_capability(index)
    if capability >= BF16_MIN_CAPABILITY:
        return None
    return (f"bf16 needs compute capability {'.'.join(map(str, BF16_MIN_CAPABILITY))} or newer (Ampere); "
            f"{torch.cuda.get_device_name(index)} is {'.'.join(map(str, capability))}: load the model in float16")


def check_supported(device: torch.device, dtype: torch.dtype, what: str) -> None:
    """Refuse devices and dtypes for which neither the kernels nor their references are meant."""
    from qoqopt.errors import QoqoptError

    if device.type not in ("cuda", "cpu"):
        raise QoqoptError(f"{what}: device {device} is not supported (qoqopt kernels run on cuda, or cpu for testing)")
    if dtype not in SUPPORTED_DTYPES:
        raise QoqoptError(f"{what}: dtype {dtype} is not supported (use float32, float16 or bfloat16)")


def use_triton(x: torch.Tensor, strict: bool, what: str, *params: torch.Tensor) -> bool:
    """Per-call backend choice of the patched modules: True for Triton, False for the reference.

    The reference also serves autograd: the Triton paths are inference-only (no backward).
    """
    from qoqopt.errors import QoqoptError

    reason = triton_unusable_reason(x.device, x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        if strict:
            raise QoqoptError(f"{what}: the Triton kernels are inference-only; run under torch.inference_mode()")
        if reason is None:
            _say_grad_fallback_once()
        return False
    if reason is not None and strict:
        raise QoqoptError(f"{what}: Triton path unavailable ({reason}) and strict=True")
    return reason is None


_GRAD_FALLBACK_SAID = []


def _say_grad_fallback_once() -> None:
    """from_pretrained's parameters require grad, so a plain ``model(**batch)`` records autograd and
    every patched module runs its torch reference: no speed-up, and nothing said. Said once."""
    if not _GRAD_FALLBACK_SAID:
        _GRAD_FALLBACK_SAID.append(True)
        warnings.warn("qoqopt.kernels: autograd is recording (the parameters require grad), so the patched modules "
                      "run their torch references; run inference under torch.inference_mode() or torch.no_grad() "
                      "(generate() does) for the Triton kernels", stacklevel=4)  # fmt: skip


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands must not silently drop to tf32 on the GPU: the fp32 path is the exactness check."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tensor_version(t: torch.Tensor) -> int | None:
    """In-place edit counter, for caches keyed on a tensor; inference-mode tensors have none."""
    return None if t.is_inference() else t._version


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: any small number keeps split-K paths exercised
