"""Layer-streaming calibration: capture decoder-layer-0 inputs once, then quantize layer by layer.

    chats = encode_chats(processor, items)                        # image+text chats, as at inference
    inputs = capture_layer0_inputs(ckpt, chats)                   # vision tower + embeddings only
    for result in stream_quantize(ckpt, inputs, options):         # one decoder layer in memory at a time
        ...                                                       # result.quantized / result.tensors

Capture builds the transformers ``Qwen2_5_VLModel`` on the *meta* device, materialises only the
vision tower, the token embedding and the rotary embedding from the checkpoint, and runs the
model's own forward until decoder layer 0 is called: a pre-hook records what that layer receives
(hidden states, the 3-D M-RoPE ``(cos, sin)``, the attention mask) and stops the forward. So image
tokens get exactly the positions transformers computes from ``mm_token_type_ids`` and
``image_grid_thw``, in whichever transformers version is installed.

Then each decoder layer is read from safetensors, run on the captured inputs (fp32), quantized
(GPTQ, AWQ or RTN from the pure functions beside this module), run again to produce the next
layer's inputs (the *quantized* outputs, so later layers correct for earlier error), and released.
Peak memory is one layer plus the activations. This module knows nothing about checkpoint formats.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from qoqopt.errors import QoqoptError

from .awq import awq_quantize, expand_kv_scale, search_clip, search_scale, tie_kv_stat, weight_mean
from .gptq import accumulate_hessian, gptq_quantize
from .rtn import QuantizedWeight, QuantSpec, rtn_quantize

# The Linears of one decoder layer, in the order they consume each other's outputs. Each inner
# tuple shares one input (the same normed hidden states or the same attention output).
LAYER_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LAYER_LINEARS = tuple(n for g in LAYER_GROUPS for n in g)
METHODS = ("gptq", "awq", "rtn")


@dataclass
class QuantizeOptions:
    method: str = "gptq"
    spec: QuantSpec = field(default_factory=QuantSpec)
    act_order: bool = False
    static_groups: bool = False
    group_aware: bool = False  # GAR visiting order without act-order's g_idx (see quantize.gptq)
    damp: float = 0.01
    block_size: int = 128
    awq_grid: int = 20
    awq_tokens: int = 4096  # calibration tokens kept per Linear for the AWQ scale search
    awq_clip_tokens: int = 512  # ... and for the clipping search
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise QoqoptError(f"unknown quantization method {self.method!r}; choose {', '.join(METHODS)}")


@dataclass
class LayerInput:
    hidden: torch.Tensor  # [1, T, H] fp32
    kwargs: dict  # what decoder layer 0 received besides hidden states (position_embeddings, mask)


@dataclass
class Captured:
    inputs: list[LayerInput]
    tokens: int
    image_tokens: int
    seconds: float
    attn_implementation: str | None = None  # the layers must run with the one the mask was built for


@dataclass
class LayerResult:
    index: int
    quantized: dict[str, QuantizedWeight]  # name inside the layer ("self_attn.q_proj") -> weight
    tensors: dict[str, torch.Tensor]  # every other tensor of the layer, storage dtype ("input_layernorm.weight")
    rel_error: float  # ||y_q - y|| / ||y - x||: output error relative to the layer's own update
    seconds: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- capture


def encode_chats(processor, items, with_answer: bool = True) -> list[dict]:
    """Processor inputs per item (input_ids, pixel_values, image_grid_thw, mm_token_type_ids)."""
    from qoqopt.calibration import encode_chat

    return [encode_chat(processor, item, with_answer) for item in items]


@contextlib.contextmanager
def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


class _RowEmbedding(torch.nn.Module):
    """The token embedding kept in its stored dtype (half the memory of fp32), rows cast on lookup."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.out_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight).to(self.out_dtype)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are recorded."""


def _state(ckpt, prefix: str, device, dtype) -> dict[str, torch.Tensor]:
    return {
        name[len(prefix) :]: ckpt.tensor(name).to(device=device, dtype=dtype)
        for name in ckpt.names
        if name.startswith(prefix)
    }


def capture_layer0_inputs(
    ckpt,
    chats: list[dict],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_hooks: Callable | None = None,
    progress: bool = True,
) -> Captured:
    """Run the chats through the vision tower + embeddings; record what decoder layer 0 receives.

    ``vision_hooks(visual)`` may register hooks on the (real) vision tower and return their handles,
    for statistics of the vision Linears; they are removed afterwards.
    """
    from transformers import Qwen2_5_VLModel

    from ..progress import bar

    if not chats:
        raise QoqoptError("no calibration chats")
    t0 = time.perf_counter()
    config = ckpt.hf_config()
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    lm = model.language_model
    with _no_init():
        visual = type(model.visual)._from_config(config.vision_config)
    visual.load_state_dict(_state(ckpt, "visual.", "cpu", dtype), strict=True)
    model.visual = visual.to(device=device, dtype=dtype).eval()
    embed = ckpt.tensor("model.embed_tokens.weight").to(device=device)  # stored dtype: rows are cast on lookup
    lm.embed_tokens = _RowEmbedding(embed, dtype)
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config).to(device)

    records: list[LayerInput] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        records.append(LayerInput(hidden.detach().float(), kept))
        raise _Stop

    handle = lm.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    extra = vision_hooks(model.visual) if vision_hooks else []
    tokens = image_tokens = 0
    try:
        with torch.no_grad():
            for chat in bar(chats, desc="vision + embeddings", show=progress, leave=False):
                batch = {k: v.to(device) for k, v in chat.items() if v is not None}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(dtype)
                model.rope_deltas = None  # positions are computed afresh for every chat
                with contextlib.suppress(_Stop):
                    model(**batch, use_cache=False)
                tokens += int(batch["input_ids"].numel())
                image_tokens += int(batch["mm_token_type_ids"].sum())
    finally:
        handle.remove()
        for h in extra:
            h.remove()
    if len(records) != len(chats):
        raise QoqoptError(f"captured {len(records)} layer inputs for {len(chats)} chats")
    attn = getattr(lm.config, "_attn_implementation", None)
    del model, visual, embed
    ckpt.close()  # unmap the shards: the vision tower's and embedding's pages leave the process
    return Captured(records, tokens, image_tokens, time.perf_counter() - t0, attn)


# --------------------------------------------------------------------------- one layer


def load_decoder_layer(ckpt, text_config, index: int, device, dtype=torch.float32):
    """Decoder layer ``index`` with its weights from the checkpoint (nothing else is read)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    with torch.device("meta"):
        layer = Qwen2_5_VLDecoderLayer(text_config, index)
    state = _state(ckpt, f"model.layers.{index}.", device, dtype)
    missing = set(layer.state_dict()) - set(state)
    if missing:
        raise QoqoptError(f"{ckpt.source}: layer {index} lacks {', '.join(sorted(missing)[:3])}")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def decoder_config(ckpt, captured: Captured, text_config=None):
    """The text config to build decoder layers with for ``captured``'s inputs. The captured attention
    mask is what create_causal_mask built for the capture's implementation (for sdpa without
    padding it is None, meaning "causal"): the layers must use the same one."""
    config = text_config or ckpt.hf_config().text_config
    config._attn_implementation = captured.attn_implementation or "sdpa"
    return config


def run_layer(layer, inputs: list[LayerInput]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for inp in inputs:
            out = layer(inp.hidden, **inp.kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outs


def _run_until(layer, inputs: list[LayerInput], last: torch.nn.Module) -> None:
    """Forward every input until ``last`` has run (its hooks fired), skipping the rest of the layer."""

    def stop(*_):
        raise _Stop

    h = last.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for inp in inputs:
                with contextlib.suppress(_Stop):
                    layer(inp.hidden, **inp.kwargs)
    finally:
        h.remove()


def _rel_error(y_q: list[torch.Tensor], y: list[torch.Tensor], x: list[LayerInput]) -> float:
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(y_q, y))
    den = sum(float((b - i.hidden).double().pow(2).sum()) for b, i in zip(y, x))
    return math.sqrt(num / den) if den > 0 else 0.0


def _set_weight(linear: torch.nn.Linear, qw: QuantizedWeight) -> None:
    linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)


def quantize_layer_gptq(layer, inputs, opts: QuantizeOptions, warn, prefix: str, notes: list[str]) -> dict[str, QuantizedWeight]:
    """True-sequential GPTQ: each group's Hessians are taken with the earlier groups already quantized."""
    out = {}
    mods = dict(layer.named_modules())
    for group in LAYER_GROUPS:
        hess: dict[str, list] = {n: [None, 0] for n in group}

        def hook_for(name):
            def hook(module, args):
                hess[name][0], hess[name][1] = accumulate_hessian(hess[name][0], hess[name][1], args[0])

            return hook

        handles = [mods[n].register_forward_pre_hook(hook_for(n)) for n in group]
        try:
            _run_until(layer, inputs, mods[group[-1]])
        finally:
            for h in handles:
                h.remove()
        for name in group:
            qw, info = gptq_quantize(
                mods[name].weight.data, hess[name][0], opts.spec, block_size=opts.block_size, damp=opts.damp,
                act_order=opts.act_order, static_groups=opts.static_groups, group_aware=opts.group_aware,
                warn=warn, name=prefix + name,
            )  # fmt: skip
            _set_weight(mods[name], qw)
            out[name] = qw
            if info.retries:
                notes.append(f"{name} needed dampening {info.damp:g}")
            if info.dead_inputs:
                notes.append(f"{name}: {info.dead_inputs} inputs never active")
    return out


class _InputStats:
    """Mean |x| per channel over all tokens, and a fixed random subset of token rows."""

    def __init__(self, keep_prob: float, clip_prob: float, generator: torch.Generator):
        self.sum_abs = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.clip_rows: list[torch.Tensor] = []
        self.keep_prob, self.clip_prob, self.gen = keep_prob, clip_prob, generator

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(dim=0)
        self.sum_abs = s if self.sum_abs is None else self.sum_abs + s
        self.count += x.shape[0]
        u = torch.rand(x.shape[0], generator=self.gen).to(x.device)
        self.rows.append(x[u < self.keep_prob])
        self.clip_rows.append(x[u < self.clip_prob])

    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)

    def clip_sample(self) -> torch.Tensor:
        return torch.cat(self.clip_rows)


def _round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def _alpha_note(group: str, r) -> str:
    """A layer note on the AWQ scale search's pick: the activation exponent, and whether the scale was
    also divided by the weights' mean magnitude (AutoAWQ's duo scaling)."""
    return f"{group} alpha {r.alpha:.2f}{', over weight mean' if r.duo else ''}"


class _AttentionCalls:
    """The attention module's calls (its inputs, whole chats up to ``tokens``), to score the q/k/v
    scale on the attention's output: q's and k's errors pass through the softmax, which their own
    outputs' error does not model (on the trained tiny model, scoring by q/k/v outputs chose a scale
    that left layer 2's output error at 0.062 against plain rounding's 0.046). AWQ's reference
    implementation scores this scale on the attention module's output as well."""

    def __init__(self, tokens: int):
        self.tokens, self.kept, self.calls = tokens, 0, []

    def add(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not self.calls or self.kept + hidden.shape[1] <= self.tokens:  # the first chat, however long
            self.kept += hidden.shape[1]
            self.calls.append((args[1:], {**kwargs, "hidden_states": hidden.detach().clone()}))

    def output_error(self, attn, linears: list[torch.nn.Linear]):
        """``error_of`` for `search_scale`: the attention output's squared error with ``linears``'
        weights replaced by the candidate's rows, against the output with their own."""
        with torch.no_grad():
            ref = [attn(*a, **kw)[0] for a, kw in self.calls]
        rows = [lin.weight.shape[0] for lin in linears]

        def error(wq: torch.Tensor) -> float:
            own = [lin.weight.data for lin in linears]
            try:
                for lin, w in zip(linears, wq.split(rows)):
                    lin.weight.data = w.to(lin.weight.dtype)
                with torch.no_grad():
                    return sum(float((attn(*a, **kw)[0] - r).double().pow(2).sum()) for (a, kw), r in zip(self.calls, ref))
            finally:
                for lin, w in zip(linears, own):
                    lin.weight.data = w

        return error


def quantize_layer_awq(layer, inputs, opts: QuantizeOptions, storage_dtype, notes: list[str]) -> dict[str, QuantizedWeight]:
    """AWQ on one layer: four scale searches folded into the preceding ops, then clipping + rounding."""
    mods = dict(layer.named_modules())
    attn = layer.self_attn
    head_dim = attn.head_dim
    n_rep = attn.num_key_value_groups
    tokens = sum(i.hidden.shape[1] for i in inputs)
    gen = torch.Generator().manual_seed(opts.seed)
    keep = min(1.0, opts.awq_tokens / tokens)
    clip_keep = min(keep, opts.awq_clip_tokens / tokens)
    taps = {"self_attn.q_proj": None, "self_attn.o_proj": None, "mlp.gate_proj": None, "mlp.down_proj": None}
    stats = {n: _InputStats(keep, clip_keep, gen) for n in taps}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0])) for n in taps]
    attn_calls = _AttentionCalls(opts.awq_tokens)
    handles.append(attn.register_forward_pre_hook(attn_calls.add, with_kwargs=True))
    try:
        _run_until(layer, inputs, mods["mlp.down_proj"])
    finally:
        for h in handles:
            h.remove()

    W = {n: mods[n].weight.data for n in LAYER_LINEARS}
    spec = opts.spec
    x = {n: s.sample() for n, s in stats.items()}
    xc = {n: s.clip_sample() for n, s in stats.items()}

    def fold_into_norm(norm, s):
        norm.weight.data = _round_to(norm.weight.data / s, storage_dtype)

    # 1. input_layernorm -> q, k, v
    st = stats["self_attn.q_proj"]
    r = search_scale(st.mean_abs(), x["self_attn.q_proj"], [W[n] for n in LAYER_GROUPS[0]], spec, n_grid=opts.awq_grid,
                     error_of=attn_calls.output_error(attn, [mods[n] for n in LAYER_GROUPS[0]]))  # fmt: skip
    s = r.scale
    fold_into_norm(layer.input_layernorm, s)
    for n in LAYER_GROUPS[0]:
        W[n].mul_(s)
    xc["self_attn.q_proj"] = xc["self_attn.q_proj"] / s
    notes.append(_alpha_note("qkv", r))

    # 2. v_proj -> o_proj, the o scale tied across each kv head's query heads
    st = stats["self_attn.o_proj"]
    tied = tie_kv_stat(st.mean_abs(), n_rep, head_dim)
    expand = lambda sv: expand_kv_scale(sv, n_rep, head_dim)  # noqa: E731
    w_tied = tie_kv_stat(weight_mean([W["self_attn.o_proj"]], spec), n_rep, head_dim)
    r = search_scale(tied, x["self_attn.o_proj"], [W["self_attn.o_proj"]], spec, n_grid=opts.awq_grid,
                     expand=expand, w_mean=w_tied)  # fmt: skip
    s_v = r.base
    s_o = r.scale
    v = mods["self_attn.v_proj"]
    W["self_attn.v_proj"].div_(s_v.unsqueeze(1))
    if v.bias is not None:
        v.bias.data = _round_to(v.bias.data / s_v, storage_dtype)
    W["self_attn.o_proj"].mul_(s_o)
    xc["self_attn.o_proj"] = xc["self_attn.o_proj"] / s_o
    notes.append(_alpha_note("v->o", r))

    # 3. post_attention_layernorm -> gate, up
    st = stats["mlp.gate_proj"]
    r = search_scale(st.mean_abs(), x["mlp.gate_proj"], [W[n] for n in LAYER_GROUPS[2]], spec, n_grid=opts.awq_grid)
    fold_into_norm(layer.post_attention_layernorm, r.scale)
    for n in LAYER_GROUPS[2]:
        W[n].mul_(r.scale)
    xc["mlp.gate_proj"] = xc["mlp.gate_proj"] / r.scale
    notes.append(_alpha_note("gate/up", r))

    # 4. up_proj -> down_proj
    st = stats["mlp.down_proj"]
    r = search_scale(st.mean_abs(), x["mlp.down_proj"], [W["mlp.down_proj"]], spec, n_grid=opts.awq_grid)
    W["mlp.up_proj"].div_(r.scale.unsqueeze(1))
    W["mlp.down_proj"].mul_(r.scale)
    xc["mlp.down_proj"] = xc["mlp.down_proj"] / r.scale
    notes.append(_alpha_note("up->down", r))

    # Clip (not q/k: their error passes through the attention softmax, which the per-group output
    # error does not model) and round.
    clip_input = {
        "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
    }  # fmt: skip
    out = {}
    for n in LAYER_LINEARS:
        max_abs = search_clip(W[n], xc[clip_input[n]], spec, n_grid=opts.awq_grid) if n in clip_input else None
        qw = awq_quantize(W[n], spec, max_abs)
        _set_weight(mods[n], qw)
        out[n] = qw
    return out


def quantize_layer(layer, inputs: list[LayerInput], opts: QuantizeOptions, *, storage_dtype, warn, prefix=""):
    """Quantize one decoder layer in place (its Linears end up holding the dequantized weights)."""
    notes: list[str] = []
    if opts.method == "gptq":
        quantized = quantize_layer_gptq(layer, inputs, opts, warn, prefix, notes)
    elif opts.method == "awq":
        quantized = quantize_layer_awq(layer, inputs, opts, storage_dtype, notes)
    else:
        mods = dict(layer.named_modules())
        quantized = {}
        for n in LAYER_LINEARS:
            quantized[n] = rtn_quantize(mods[n].weight.data, opts.spec)
            _set_weight(mods[n], quantized[n])
    return quantized, notes


def check_layer_shapes(text_config, spec: QuantSpec, pack_cols: int) -> None:
    """One-line errors before any work: every text Linear must split into whole groups and words."""
    h, i = text_config.hidden_size, text_config.intermediate_size
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    hd = h // heads
    shapes = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "o_proj": (h, heads * hd),
              "gate_proj": (i, h), "down_proj": (h, i)}  # fmt: skip
    for name, (n, k) in shapes.items():
        if spec.group_size != -1 and k % spec.group_size:
            raise QoqoptError(f"--group-size {spec.group_size} does not divide {name}'s {k} input features")
        if n % pack_cols:
            raise QoqoptError(f"{name} has {n} outputs, not a multiple of {pack_cols} as the packed format needs")


def stream_quantize(
    ckpt,
    captured: Captured,
    opts: QuantizeOptions,
    *,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    text_config=None,
) -> Iterator[LayerResult]:
    """Quantize the decoder layers one at a time, each fed the previous quantized layer's outputs."""
    config = decoder_config(ckpt, captured, text_config)
    inputs = captured.inputs
    n_layers = config.num_hidden_layers
    for i in range(n_layers):
        t0 = time.perf_counter()
        layer = load_decoder_layer(ckpt, config, i, device)
        storage = {k: _stored_dtype(ckpt, f"model.layers.{i}.{k}") for k in layer.state_dict()}
        ckpt.close()  # each layer's mapped pages are released with it
        ref = run_layer(layer, inputs)
        quantized, notes = quantize_layer(
            layer, inputs, opts, storage_dtype=storage["input_layernorm.weight"], warn=log, prefix=f"layer {i} "
        )
        outs = run_layer(layer, inputs)
        err = _rel_error(outs, ref, inputs)
        tensors = {
            k: v.detach().to("cpu", storage[k])
            for k, v in layer.state_dict().items()
            if k.removesuffix(".weight") not in quantized
        }
        clamped = sum(q.clamped_zeros for q in quantized.values())
        if clamped:
            notes.append(f"{clamped} zero-points raised to {opts.spec.zero_min}")
        quantized = {k: _to_cpu(q) for k, q in quantized.items()}
        del layer, ref
        inputs = [LayerInput(o, inp.kwargs) for o, inp in zip(outs, inputs)]
        dt = time.perf_counter() - t0
        log(f"layer {i + 1}/{n_layers}: {opts.method} relative output error {err:.4f} ({dt:.1f} s)"
            + (f"; {', '.join(notes)}" if notes else ""))  # fmt: skip
        yield LayerResult(i, quantized, tensors, err, dt, notes)


_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _stored_dtype(ckpt, name: str) -> torch.dtype:
    stored = ckpt.tensor_info(name)["dtype"]
    if stored not in _SAFETENSORS_TO_TORCH:
        raise QoqoptError(f"{name} is stored as {stored}; qoqopt quantizes F32/F16/BF16 checkpoints")
    return _SAFETENSORS_TO_TORCH[stored]


def _to_cpu(q: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(q.intweight.cpu(), q.zeros.cpu(), q.scales.cpu(), q.g_idx.cpu(), q.bits, q.clamped_zeros)
