"""transformers runtime for bench variants: the reference, bf16/fp16/fp32, bitsandbytes, and GPTQ/AWQ
builds through qoqopt's own W4A16 QuantLinear (Triton on CUDA, its torch reference on CPU)."""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import QoqoptError
from .variants import HF_DTYPES, Variant

def image_question(image, question: str) -> list[dict]:
    """One user turn, the image then the question, as the processor's chat template takes it."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


class HFRunner:
    def __init__(self, model, processor, runtime: str, device: str):
        self.model, self.processor, self.runtime, self.device = model, processor, runtime, device
        self._prompts: dict = {}  # item id -> processed prompt of its drift pass, reused by answer()

    # ---- drift
    def reply_logits(self, item, chat: dict) -> np.ndarray:
        return self.reference_chat(item, chat["reply_ids"])[0]

    def reference_chat(self, item, reply_ids: list[int] | None = None) -> tuple[np.ndarray, dict]:
        """Teacher-forced next-token logits at the reference reply's positions, and the chat's
        tokenization (prompt text with a media marker, reply ids, image token count)."""
        from ..exports.gguf_verify import reference

        chat = reference(self.model, self.processor, item, self.device)
        if reply_ids is not None and chat["reply_ids"] != list(reply_ids):
            raise QoqoptError(f"{item.id}: this variant's tokenizer splits the reply differently from the reference's")
        self._prompts[item.id] = chat.pop("prompt_inputs")
        return chat.pop("ref_logits"), chat

    def answer(self, item, chat: dict, max_new_tokens: int) -> str:
        inputs = self._prompts.pop(item.id, None)  # the image was already processed for this chat's drift
        return self._generate(inputs if inputs is not None else self._inputs(item.messages()), max_new_tokens)

    def reply(self, image, question: str, max_new_tokens: int) -> str:
        """Greedy reply to one image question, through the processor's chat template."""
        inputs = self._inputs(image_question(image, question))
        n, limit = inputs["input_ids"].shape[1], self.model.config.get_text_config().max_position_embeddings
        if n + max_new_tokens > limit:  # generate() would run past the positions the model was trained on, unsaid
            raise QoqoptError(f"the prompt is {n} tokens (text and image) and the reply up to {max_new_tokens}, but "
                              f"the model's context holds {limit}: shorten the question or the reply")  # fmt: skip
        return self._generate(inputs, max_new_tokens)

    def _inputs(self, messages):
        from ..mini import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

        # QoQ-Med's training image range, as llama.cpp is given it (mtmd's image tokens): a checkpoint's
        # preprocessor_config.json may say Qwen's 3136..12845056, and a 1024x1024 scan was then 1369
        # image tokens here and 625 in llama.cpp. The clinical sets' images lie inside the range already.
        size = {"shortest_edge": TRAIN_MIN_PIXELS, "longest_edge": TRAIN_MAX_PIXELS}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt", processor_kwargs={"size": size})  # fmt: skip

    def _generate(self, inputs, new_tokens: int, exact: bool = False, clock=None) -> str:
        import torch

        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        fixed = {"min_new_tokens": new_tokens} if exact else {}
        if clock is not None:
            fixed["logits_processor"] = [clock]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0, **fixed)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    # ---- speed
    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def profile(self, image, question: str, n_decode: int) -> dict:
        """One request of 1 + `n_decode` greedy tokens, timed from the raw image as llama.cpp's is.
        TTFT ends at the first step's logits (preprocessing, vision tower and prompt before them),
        decode is the `n_decode` steps after that, time-stamped inside the same generate(): never a
        difference of two requests, whose own noise would all land in the decode figure."""
        messages = image_question(image, question)
        self._sync()
        t0 = time.perf_counter()
        inputs = self._inputs(messages)
        preprocess = time.perf_counter() - t0
        clock = _step_clock(self._sync)
        # prefill is the language model's first pass and its logits, as llama.cpp's prompt decode:
        # TTFT less the encode also held generate()'s own host work (~16 ms a request on an H200,
        # more than a 2-layer model's whole prompt pass), which no GGUF row pays
        with (self._timed(self.model.model.visual) as vision, self._timed(self.model.model.language_model, calls=1) as lm,
              self._timed(self.model.lm_head, calls=1) as head):  # fmt: skip
            self._generate(inputs, 1 + n_decode, exact=True, clock=clock)
        if len(clock.times) != 1 + n_decode:
            raise RuntimeError(f"generate() took {len(clock.times)} steps for {1 + n_decode} tokens")
        n_image = int((inputs["input_ids"] == self.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        return {"encode_s": preprocess + vision.seconds, "ttft_s": clock.times[0] - t0,
                "prefill_s": lm.seconds + head.seconds, "decode_s": clock.times[-1] - clock.times[0],
                "n_prompt": int(inputs["input_ids"].shape[1]), "n_image_tokens": n_image}  # fmt: skip

    @contextmanager
    def _timed(self, module, calls: int | None = None):
        """Seconds spent in `module`'s forward calls (device-synchronised) while the block runs: all
        of them, or the first `calls`."""
        span = SimpleNamespace(seconds=0.0, start=0.0, calls=0)

        def before(*_):
            if calls is None or span.calls < calls:
                self._sync()
                span.start = time.perf_counter()

        def after(*_):
            if calls is None or span.calls < calls:
                self._sync()
                span.seconds += time.perf_counter() - span.start
            span.calls += 1

        hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield span
        finally:
            for h in hooks:
                h.remove()

    def peak_device_mb(self) -> float | None:
        """MiB torch's allocator held at most since the model was loaded (its weights, plus what
        inference adds): load-time temporaries (a fusion's, a dtype cast's) are not what running needs."""
        if self.device != "cuda":
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20

    def start_peaks(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def close(self) -> None:
        self.model = None


def _step_clock(sync):
    """A logits processor that time-stamps each generation step once its logits exist (synced on
    CUDA): generate() calls it once per new token, after that step's forward pass."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def load_hf(model_path: Path, variant: Variant, files: dict, device: str, reference_dtype: str = "float32") -> HFRunner:
    """The variant as a transformers model on `device`. `variant` None means the reference."""
    from ..calibration import load_hf_model
    from ..loader import checked_processor

    processor = checked_processor(model_path, str(model_path))
    if variant is None or variant.format == "hf":
        dtype = reference_dtype if variant is None else HF_DTYPES[variant.option]
        return HFRunner(load_hf_model(model_path, dtype, device), processor, f"transformers {dtype}", device)
    if variant.format in ("gptq", "awq"):
        return _load_w4a16(files["dir"], processor, device)
    if variant.format == "bnb":
        return _load_bnb(model_path, variant.option, processor, device)
    raise QoqoptError(f"{variant.name} does not run in transformers")


def load_folder(folder: Path, quantized: bool, device: str) -> HFRunner:
    """A qoqopt GPTQ/AWQ export directory (``quantized``, through qoqopt's W4A16 layers) or a plain
    checkpoint (fp32 compute up to ~3 B parameters, bf16 beyond), as `qoqopt ask` runs them."""
    from ..calibration import load_hf_model
    from ..loader import checked_processor, read_json_object, validate_config

    processor = checked_processor(folder, str(folder))
    # a GPTQ/AWQ folder without qoqopt's manifest (another tool's build, a Hub repo) is one too:
    # transformers' own loader wanted optimum and gptqmodel, and failed in a traceback without them
    config = read_json_object(Path(folder) / "config.json")
    validate_config(config, str(folder))
    method = (config.get("quantization_config") or {}).get("quant_method")
    if quantized or method in ("gptq", "awq"):
        return _load_w4a16(folder, processor, device)
    if method:
        raise QoqoptError(f"{folder} is a {str(method).upper()} build (its config.json has a quantization_config): "
                          "qoqopt runs GPTQ and AWQ builds and unquantized checkpoints")  # fmt: skip
    from ..kernels.tuning import dtype_name

    model = load_hf_model(folder, "auto", device)
    return HFRunner(model, processor, f"transformers {dtype_name(model.dtype)}", device)


def _load_w4a16(folder: Path, processor, device: str) -> HFRunner:
    import torch

    from ..exports.hf_quant import load_with_quant_linear
    from ..kernels.tuning import dtype_name

    # On CUDA the Triton kernel runs in bf16, the dtype QoQ-Med was trained in (fp16 risks overflow in
    # the vision tower); on CPU the torch reference path runs in fp32.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_with_quant_linear(folder, dtype).to(device)
    backend = "torch reference"
    if device == "cuda":  # the vision kernels too: this is the runtime qoqopt ships for these builds
        from ..kernels import apply

        backend = apply(model).backend
    return HFRunner(model, processor, f"transformers + qoqopt W4A16 ({backend}, {dtype_name(dtype)})", device)


def missing_bnb_packages() -> list[str]:
    """transformers quantizes bnb variants at load through bitsandbytes, and loads them through accelerate."""
    return [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]


def _load_bnb(model_path: Path, kind: str, processor, device: str) -> HFRunner:
    import torch
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    missing = missing_bnb_packages()
    if missing:
        raise QoqoptError(f"bnb variants need {' and '.join(missing)} (pip install 'qoqopt[bnb]')")
    if kind == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_path), quantization_config=qc, dtype=torch.bfloat16, device_map=device
    )
    return HFRunner(model.eval(), processor, f"transformers + bitsandbytes {kind} (bfloat16)", device)
