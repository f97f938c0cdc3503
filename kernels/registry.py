"""One declarative table of module replacements, and ``apply(model)`` that walks it.

Each :class:`Patch` says which modules it takes (by class name, so no transformers import is needed
and the table survives transformers moving classes between files) and how to build the replacement
from the original. Replacements keep the original's parameters and submodule names, so a patched
model keeps its state_dict keys. Adding an op means adding a row, not a function per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from qoqopt.errors import QoqoptError

from . import tuning
from ._triton import check_supported, triton_unusable_reason
from .fused_projections import fuse_projections
from .merger import DEFAULT_PLAN as DEFAULT_MERGER_PLAN, MERGER_PLANS, FusedPatchMerger
from .patch_embed import MatmulPatchEmbed
from .vision_attention import FusedVisionAttention, VarlenPlanCache
from .vision_mlp import FusedGateUpMLP
from .w4a16 import QuantLinear, check_foreign


@dataclass
class PatchContext:
    strict: bool
    merger_plan: str = DEFAULT_MERGER_PLAN
    plans: VarlenPlanCache = field(default_factory=VarlenPlanCache)  # shared by all attention layers
    dtype: torch.dtype = torch.float32  # the model's: what a foreign layer is checked with


@dataclass(frozen=True)
class Patch:
    op: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, PatchContext], nn.Module]
    # the replacement runs the original's submodules as they are (attention calls its qkv and proj),
    # so those are still patched themselves: a quantized qkv becomes a W4A16 layer inside it
    keeps_children: bool = False


def by_class(*names: str) -> Callable[[nn.Module], bool]:
    return lambda module: type(module).__name__ in names


def is_packed_linear(module: nn.Module) -> bool:
    """A GPTQ/AWQ linear from any library (ours included): it carries the three packed tensors."""
    return all(hasattr(module, name) for name in ("qweight", "qzeros", "scales"))


def is_plain_vision_mlp(module: nn.Module) -> bool:
    """A vision MLP whose gate and up are Linears (their weights are concatenated); with quantized
    ones (an AWQ build's --quantize-vision) each becomes a W4A16 layer, and gate/up fuse as packed."""
    return by_class("Qwen2_5_VLMLP")(module) and all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj"))


def w4a16_layer(module: nn.Module, ctx: PatchContext) -> QuantLinear:
    """The QuantLinear for a packed linear: refused where the kernels cannot run it (a QuantLinear
    left as it is runs its torch reference) and, built from a foreign layer, where it does not
    compute what that layer computes (:func:`~.w4a16.check_foreign`)."""
    layer = QuantLinear.from_module(module, ctx.strict)
    if layer.kernel_blocker is not None:
        raise QoqoptError(f"{layer.kernel_blocker}; left as it was")
    if layer is not module:
        check_foreign(module, layer, ctx.dtype)
    return layer


REGISTRY: tuple[Patch, ...] = (
    Patch("patch_embed", by_class("Qwen2_5_VisionPatchEmbed"), lambda m, ctx: MatmulPatchEmbed.from_hf(m)),
    Patch("vision_mlp", is_plain_vision_mlp, lambda m, ctx: FusedGateUpMLP.from_hf(m)),
    Patch("vision_attention", by_class("Qwen2_5_VLVisionAttention"),
          lambda m, ctx: FusedVisionAttention.from_hf(m, ctx.plans, ctx.strict), keeps_children=True),
    Patch("merger", by_class("Qwen2_5_VLPatchMerger"), lambda m, ctx: FusedPatchMerger.from_hf(m, ctx.strict, ctx.merger_plan)),
    Patch("w4a16", is_packed_linear, w4a16_layer),
)


@dataclass
class PatchReport:
    counts: dict[str, int]
    backend: str  # "triton" or "torch"
    fallback_reason: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why it was left alone
    merger_plan: str = DEFAULT_MERGER_PLAN
    w4a16_tuning: list[str] = field(default_factory=list)  # this GPU's decode tuning tables (kernels.tuning)

    def __str__(self) -> str:
        plan = {"merger": f" ({self.merger_plan} plan)"}
        ops = ", ".join(f"{op} x{n}{plan.get(op, '')}" for op, n in self.counts.items() if n) or "nothing"
        line = f"qoqopt.kernels: patched {ops} (backend: {self.backend}"
        line += f"; {self.fallback_reason})" if self.fallback_reason else ")"
        for path, why in self.skipped.items():
            line += f"\n  skipped {path}: {why}"
        for table in self.w4a16_tuning:
            line += f"\n  W4A16 decode tuning table for this GPU: {table}"
        return line


# "auto": fragment words wherever a layer fits them, is wide enough for them to be faster
# (w4a16.fragment_words_pay) and Triton runs, quietly GPTQ's elsewhere; "fragments": every layer
# that fits, naming each one that keeps GPTQ's; "gptq": no repacking
W4A16_WORDS = ("auto", "fragments", "gptq")


def apply(model: nn.Module, strict: bool = False, fuse: bool = True, w4a16_words: str = "auto",
          merger: str = DEFAULT_MERGER_PLAN) -> PatchReport:
    """Patch a transformers ``Qwen2_5_VLForConditionalGeneration`` in place with qoqopt kernels.

    Unsupported device or dtype: QoqoptError. No usable Triton (not installed, or CPU without
    ``TRITON_INTERPRET=1``, or bf16 on the CPU interpreter): the torch references run instead, or
    QoqoptError when ``strict``. With ``fuse``, quantized q/k/v and gate/up projections then run as
    one launch each (:mod:`.fused_projections`), and every quantized layer that fits (4-bit, K and
    group_size multiples of 128: every 7B linear) is repacked in memory as fragment words
    (``QuantLinear.use_fragment_words``; checkpoints keep GPTQ's), unless narrower than
    ``w4a16.FRAGMENT_MIN_N`` outputs, where GPTQ words decode faster. On an H200 that took decode from
    27 to 17 us at gate/up (M = 1) and from 41 to 18 at M = 16. ``w4a16_words="fragments"`` repacks
    every layer that fits, whatever its width, and names each one that cannot be; ``"gptq"`` repacks
    nothing. The patch merger runs its norm in one Triton pass and its GEMMs in cuBLAS
    (``merger="cublas"``: 1.44x eager at 5120 patches on the H200, against 1.15x for ``"fused"``, the
    single Triton fc1 with norm and GELU inside; ``"overlap"``, untimed, runs the cublas plan over row
    chunks side by side, each on its own CUDA stream; :mod:`.merger`). Returns what was patched, per op.
    A packed linear of another library (GPTQModel's, AutoAWQ's) is replaced only where the replacement
    answers a few random rows as that layer's own forward does (a kernel's repack at load reorders its
    words); a layer the kernels cannot run (group_size not a multiple of 16) is left as it is. Either
    is named in ``report.skipped`` (QoqoptError when ``strict``). An apply that stops part-way (that
    error, or out of memory) leaves the modules it swapped, each computing as the one it replaced, and
    a second apply refuses the model: load it again.
    A model is patched once; the kernels run under ``torch.inference_mode()`` or ``torch.no_grad()``
    (a forward recording autograd runs the torch references, and says so once).
    """
    if not isinstance(model, nn.Module):
        raise QoqoptError(f"apply: expects the loaded model (a torch.nn.Module such as transformers' "
                          f"Qwen2_5_VLForConditionalGeneration), got {type(model).__name__}")  # fmt: skip
    if getattr(model, _PATCHED, False) == _PARTLY:
        raise QoqoptError(f"apply: this {type(model).__name__} was partly patched by an apply that stopped "
                          "part-way; load it again to apply")  # fmt: skip
    if getattr(model, _PATCHED, False):
        raise QoqoptError(f"apply: this {type(model).__name__} is patched already (apply patches in place, once)")
    if w4a16_words not in W4A16_WORDS:
        raise QoqoptError(f"apply: w4a16_words={w4a16_words!r}; choose from {', '.join(W4A16_WORDS)}")
    if merger not in MERGER_PLANS:
        raise QoqoptError(f"apply: merger={merger!r}; choose from {', '.join(MERGER_PLANS)}")
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        raise QoqoptError("apply: the model has no floating-point parameters or buffers")
    first = tensors[0]  # parameters first; a bare quantized layer only has float buffers
    _check_devices({t.device for t in tensors})
    check_supported(first.device, first.dtype, "apply")
    reason = triton_unusable_reason(first.device, first.dtype)
    if reason is not None and strict:
        raise QoqoptError(f"apply(strict=True): Triton kernels unavailable: {reason}")

    ctx = PatchContext(strict=strict, merger_plan=merger, dtype=first.dtype)
    report = PatchReport(counts={p.op: 0 for p in REGISTRY}, backend="torch" if reason else "triton",
                         fallback_reason=f"torch reference: {reason}" if reason else None, merger_plan=merger)
    targets = _find_targets(model)
    if any(not path for path, _ in targets):
        raise QoqoptError(f"apply: patches the modules inside a model; give it the model that holds this "
                          f"{type(model).__name__}, not the {type(model).__name__} itself")  # fmt: skip
    # before any swap: a stopped apply's attention layers need it too
    hooks = _plans_per_forward(model, ctx.plans) if any(p.op == "vision_attention" for _, p in targets) else []
    try:
        _swap(model, targets, ctx, report)
    except BaseException:
        if not getattr(model, _PATCHED, False):  # nothing swapped: the model is as it was given
            _remove(hooks)
        raise
    if not any(report.counts.values()):
        _remove(hooks)
        if report.skipped:  # every match refused: say why (they share a reason, as a whole checkpoint's bits)
            path, why = next(iter(report.skipped.items()))
            more = f" (and {len(report.skipped) - 1} more)" if len(report.skipped) > 1 else ""
            raise QoqoptError(f"apply: nothing could be patched in {type(model).__name__}: {path}: {why}{more}")
        raise QoqoptError(f"apply: nothing to patch in {type(model).__name__} (expected a Qwen2.5-VL model)")
    setattr(model, _PATCHED, True)
    if fuse:
        report.counts |= fuse_projections(model, report.skipped)
    if w4a16_words != "gptq":
        report.counts["w4a16 fragment words"] = _use_fragment_words(model, report, reason, w4a16_words == "fragments")
    if report.counts["w4a16"] and not reason:  # read afresh (one may have been written since), and a
        tuning.forget()  # broken table fails here, not at the first forward
        report.w4a16_tuning = [str(path) for path in tuning.tables_for(first.device)]
    return report


def _swap(model: nn.Module, targets: list[tuple[str, Patch]], ctx: PatchContext, report: PatchReport) -> None:
    """Build each target's replacement and swap it in, counting it in ``report`` (or naming it in
    ``report.skipped`` where it is refused, unless ``ctx.strict``)."""
    swapped = 0
    try:
        for path, patch in targets:
            # fetched by path, one at a time: a replaced module (a foreign layer that was repacked) is
            # freed as soon as it is swapped out, not kept alive by a list until every build is done
            module = model.get_submodule(path)
            try:
                replacement = patch.build(module, ctx)
            except QoqoptError as err:
                if ctx.strict:
                    raise QoqoptError(f"apply: {path}: {err}{_left_behind(swapped)}") from err
                report.skipped[path] = str(err)
                continue
            if replacement is not module:
                _set_submodule(model, path, replacement)
                swapped += 1
            del module, replacement
            report.counts[patch.op] += 1
    except BaseException:
        if swapped:  # a strict refusal, or an error part-way (out of memory, Ctrl-C)
            setattr(model, _PATCHED, _PARTLY)
        raise


def _left_behind(swapped: int) -> str:
    """What a strict apply that stops leaves: the modules swapped before it stay (each computes as
    the one it replaced; putting them back would mean holding every original, a foreign layer's
    words twice, until the end), and the model is marked so that a second apply refuses it."""
    return (f" ({swapped} module(s) before it were replaced already, each computing as the one it replaced; "
            "load the model again to apply)") if swapped else ""


_PATCHED = "_qoqopt_kernels_applied"  # set on a patched model: a second apply() would find only its own modules
_PARTLY = "partly"  # its value where an apply stopped after swapping modules


def _use_fragment_words(model: nn.Module, report: PatchReport, no_triton: str | None, explain: bool) -> int:
    """Repack every QuantLinear that fits fragment words (after fusion: a fused layer is repacked
    whole); the others keep GPTQ's, each named in the report when ``explain``."""
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, QuantLinear)]
    if no_triton:  # the torch reference reads GPTQ's words: repacking would only add a conversion per call
        if layers and explain:
            report.skipped["w4a16 fragment words"] = f"{len(layers)} layer(s) kept GPTQ words: the torch reference runs"
        return 0
    count = 0
    for path, layer in layers:
        if layer.use_fragment_words(only_where_faster=not explain):
            count += 1
        elif explain:
            report.skipped[path] = (f"kept GPTQ words: fragment words need 4 bits and K and group_size multiples "
                                    f"of 128 (bits {layer.bits}, K {layer.in_features}, group_size {layer.group_size})")
    return count


def _remove(hooks: list) -> None:
    for hook in hooks:
        hook.remove()


def _plans_per_forward(model: nn.Module, plans: VarlenPlanCache) -> list:
    """The attention layers' shared plans are made once per forward of the vision tower and dropped
    at the next: a caller may pass the tower its ``cu_seqlens`` precomputed, refilling one buffer in
    place between forwards, which an inference tensor's missing version counter would not show."""
    return [module.register_forward_pre_hook(plans.clear) for module in model.modules()
            if type(module).__name__ == "Qwen2_5_VisionTransformerPretrainedModel"]  # fmt: skip


def _find_targets(model: nn.Module) -> list[tuple[str, Patch]]:
    """(path, patch) for every match, outermost first; a matched module's children are not visited
    unless its patch keeps them (they are then patched after it, found again by path)."""
    found = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") and not patch.keeps_children for prefix, patch in found):
            continue
        patch = next((p for p in REGISTRY if p.matches(module)), None)
        if patch is not None:
            found.append((path, patch))
    return found


def _check_devices(devices: set[torch.device]) -> None:
    """One kind of device for the whole model: GPUs (any number: each launch goes to its layer's), or
    the CPU for testing. Offloaded layers (``device_map`` with "cpu" or "disk": weights on the CPU or
    the meta device until accelerate loads them for a forward) would be patched with no weights."""
    kinds = sorted({d.type for d in devices})
    if "meta" in kinds or len(kinds) > 1:
        raise QoqoptError(f"apply: the model's weights are on {' and '.join(kinds)}; qoqopt's kernels need every "
                          "layer's weights on a GPU (load it without CPU or disk offload, or with device_map='cuda')")


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    _keep_accelerate_hook(getattr(parent, name), new)
    setattr(parent, name, new)


def _keep_accelerate_hook(old: nn.Module, new: nn.Module) -> None:
    """A model loaded with ``device_map`` carries accelerate hooks on the modules it placed; the one
    on a module given its own GPU moves that module's inputs there. Its replacement keeps the hook."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None and getattr(new, "_hf_hook", None) is None:
        from accelerate.hooks import add_hook_to_module  # present: it attached the hook

        add_hook_to_module(new, hook)
