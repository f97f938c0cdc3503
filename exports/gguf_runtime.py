"""Run an exported GGUF (+ mmproj) in llama.cpp itself, through llama-cpp-python: the verifier side.

    with LlamaVL("m.F16.gguf", "mmproj-m-f16.gguf") as vl:
        vl.tokenize("<|im_start|>user\\n...")               # llama.cpp's tokenizer
        vl.logits(ids)                                       # [n, vocab] next-token logits
        vl.image_embeddings(pil_image)                       # [n_tokens, hidden], mtmd_encode_chunk
        vl.chat_logits(prompt, image, reply_ids)             # teacher-forced logits after an image prompt
        vl.generate(prompt, image, max_tokens=32)            # greedy text after an image prompt

The multimodal path is llama.cpp's own (`mtmd`): it resizes and normalises the image, runs the
clip graph, places the image embeddings with M-RoPE positions and continues with text.
`f32_kv=True` keeps the KV cache in F32 (the default F16 cache alone costs ~1e-3 relative error).
"""

from __future__ import annotations

import ctypes
import time
from contextlib import contextmanager

import numpy as np

from qoqopt.errors import QoqoptError
from qoqopt.interrupts import deferred_signals

from .llama_memory import BufferLog

MARKER = "<__media__>"


def chat_prompt(question: str, system: str = "You are a helpful assistant.") -> str:
    """The Qwen2.5-VL chat template's text for one image + question; mtmd wraps the image in
    <|vision_start|>..<|vision_end|> itself."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{MARKER}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


class LlamaVL:
    def __init__(
        self,
        model_path,
        mmproj_path=None,
        *,
        n_ctx: int = 2048,
        f32_kv: bool = False,
        threads: int = 2,
        image_min_tokens: int = 0,
        image_max_tokens: int = 0,
        embd_cache: dict | None = None,
        gpu: bool = False,
        one_gpu: bool = False,
        extra_buffers: bool | None = None,
    ):
        """``extra_buffers``: load weights into llama.cpp's extra buffer types (repacked for the CPU's
        kernels, AMX's among them), as llama.cpp does by default; None: unless its AMX kernels
        crash here (`llama_amx`). ``one_gpu``: with ``gpu``, the first visible GPU only (torch's
        cuda:0), where llama.cpp by default splits the layers over every GPU it sees."""
        import llama_cpp
        from llama_cpp import Llama

        from .llama_amx import extra_buffers_run

        self._llama_cpp = llama_cpp
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
        # a GPU build adds every GPU to the model's devices whatever n_gpu_layers says, and then runs
        # batches of 32+ tokens there (op_offload): "no GPU" must empty the device list itself
        if not gpu:
            where = {"split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE, "main_gpu": -1}
        elif one_gpu:
            where = {"split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE, "main_gpu": 0}
        else:  # llama.cpp's default: layers split over every GPU
            where = {}
        if extra_buffers is None:
            extra_buffers = gpu or extra_buffers_run(model_path)  # a CPU verdict: offloaded layers run on the GPU
        _route_log()  # from here on llama.cpp's log is read: its errors, and the buffers it allocates
        _ERRORS.clear()  # what was logged before this load is not its own
        BUFFERS.clear()
        try:
            with deferred_signals(), _model_params(llama_cpp, **({} if extra_buffers else {"use_extra_bufts": False})):
                # deferred_signals: a Ctrl-C would land in llama.cpp's log callback and be lost
                # a prompt is decoded as one batch; llama.cpp runs it in ubatches of at most 2048, which
                # holds any image QoQ-Med takes (668 tokens, attended both ways, so never split) and
                # keeps the compute buffer of a long context at the size of a 2048 one
                self.llm = Llama(
                    str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 2048), logits_all=True,
                    n_threads=threads, n_threads_batch=threads, verbose=False, n_gpu_layers=-1 if gpu else 0, **where, **kv,
                )  # fmt: skip
        except ValueError as exc:  # llama-cpp-python's only word on it: "Failed to load model from file"
            if "Failed to load model" not in str(exc):
                raise
            raise _ERRORS.error(f"llama.cpp could not load {model_path}: a part missing, a GGUF from a newer "
                                "llama.cpp, or not enough memory") from exc  # fmt: skip
        self.n_vocab = self.llm.n_vocab()
        self.embd_cache = embd_cache  # (image key) -> image embeddings; valid for one mmproj only
        self.last_prompt_tokens = 0  # tokens (text + image) of the last prompt evaluated
        self.last_image_tokens = 0  # ... and how many of them were image tokens
        self.last_encode_s = 0.0  # ... and the seconds spent preprocessing and encoding its images
        self.mctx = None
        if mmproj_path is not None:
            from llama_cpp import mtmd_cpp

            self._mtmd = mtmd_cpp
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = gpu
            params.print_timings = False
            params.n_threads = threads
            params.warmup = False
            params.media_marker = MARKER.encode()
            params.image_min_tokens = image_min_tokens
            params.image_max_tokens = image_max_tokens
            mtmd_cpp.mtmd_helper_log_set(_LOG_CALLBACK, None)  # also sets mtmd_log_set
            _ERRORS.clear()  # errors logged before this load are not its own
            with deferred_signals():
                self.mctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
            if not self.mctx:
                raise _ERRORS.error(f"llama.cpp could not load the mmproj {mmproj_path}")
            if not mtmd_cpp.mtmd_support_vision(self.mctx):
                raise QoqoptError(f"{mmproj_path} loaded but has no vision encoder")

    # ---- lifecycle
    def close(self) -> None:
        if self.mctx:
            self._mtmd.mtmd_free(self.mctx)
            self.mctx = None
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- text
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self.llm.detokenize(ids, special=special).decode("utf-8", "replace")

    def reset(self) -> None:
        self.llm.reset()
        with deferred_signals():
            self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self.llm.ctx), True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of `ids` (a fresh sequence)."""
        self.reset()
        with deferred_signals():
            self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    # ---- images
    def _bitmap(self, image):
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w, _ = rgb.shape
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = self._mtmd.mtmd_bitmap_init(w, h, buf)
        if not bitmap:
            raise _ERRORS.error("llama.cpp could not take the image")
        return bitmap

    def _chunks(self, prompt: str, images: list):
        if prompt.count(MARKER) != len(images):
            raise QoqoptError(f"prompt has {prompt.count(MARKER)} {MARKER} markers for {len(images)} image(s)")
        m = self._mtmd
        bitmaps = [self._bitmap(im) for im in images]
        arr = (m.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        chunks = m.mtmd_input_chunks_init()
        text = m.mtmd_input_text(prompt.encode("utf-8"), len(prompt.encode("utf-8")), False, True)
        with deferred_signals():  # each call that logs through read_log: see interrupts.py
            rc = m.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), arr, len(bitmaps))
        for b in bitmaps:
            m.mtmd_bitmap_free(b)
        if rc != 0:
            m.mtmd_input_chunks_free(chunks)
            raise _ERRORS.error(f"mtmd_tokenize failed ({rc})")
        return chunks

    def image_embeddings(self, image) -> np.ndarray:
        """The merged image embeddings llama.cpp computes for `image`: [n_tokens, text hidden]."""
        m = self._require_mtmd()
        chunks = self._chunks(MARKER, [image])
        try:
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_embd = self._llama_cpp.llama_model_n_embd(self.llm.model)
                    return self._encode(chunk, None).reshape(-1, n_embd)
            raise QoqoptError("the image produced no image chunk")
        finally:
            m.mtmd_input_chunks_free(chunks)

    def _require_mtmd(self):
        if not self.mctx:
            raise QoqoptError("no mmproj loaded")
        return self._mtmd

    def _encode(self, chunk, key) -> np.ndarray:
        """Image embeddings of an image chunk, from `self.embd_cache` when the same image was encoded before."""
        m = self._mtmd
        if key is not None and self.embd_cache is not None and key in self.embd_cache:
            return self.embd_cache[key]
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        with deferred_signals():
            rc = m.mtmd_encode_chunk(self.mctx, chunk)
        if rc != 0:
            raise _ERRORS.error("mtmd_encode_chunk failed")
        n_embd = self._llama_cpp.llama_model_n_embd(self.llm.model)
        embd = np.ctypeslib.as_array(m.mtmd_get_output_embd(self.mctx), shape=(n * n_embd,)).copy()
        if key is not None and self.embd_cache is not None:
            self.embd_cache[key] = embd
        return embd

    def _eval_prompt(self, prompt: str, images: list, image_keys: list | None = None, reserve: int = 0) -> int:
        """Evaluate a prompt with images into a fresh KV cache, leaving room for `reserve` more
        tokens; returns n_past (next position).

        Text chunks are decoded as token batches; image chunks are encoded by the mmproj (or taken
        from `embd_cache` under `image_keys`) and decoded with llama.cpp's M-RoPE image positions.
        """
        m = self._require_mtmd()
        self.reset()
        keys = list(image_keys) if image_keys else [None] * len(images)
        t0 = time.perf_counter()
        chunks = self._chunks(prompt, images)  # mtmd resizes and normalises the images here
        self.last_encode_s = time.perf_counter() - t0
        try:
            n_past, n_chunks = 0, m.mtmd_input_chunks_size(chunks)
            self._check_fits(m, chunks, n_chunks, reserve)
            # Under M-RoPE an image advances the position by its grid side, not its token count.
            self.last_prompt_tokens = self.last_image_tokens = 0
            for i in range(n_chunks):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
                self.last_prompt_tokens += n_tokens
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    self._run_batch([ptr[j] for j in range(count.value)], n_past, False)
                    n_past += count.value
                    continue
                self.last_image_tokens += n_tokens
                t0 = time.perf_counter()
                embd = self._encode(chunk, keys.pop(0))
                self.last_encode_s += time.perf_counter() - t0
                new_n_past = self._llama_cpp.llama_pos(0)
                with deferred_signals():
                    rc = m.mtmd_helper_decode_image_chunk(
                        self.mctx, self.llm.ctx, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                        n_past, 0, self.llm.n_batch, ctypes.byref(new_n_past), m.mtmd_helper_post_decode_callback(), None,
                    )  # fmt: skip
                if rc != 0:
                    raise _ERRORS.error(f"llama.cpp could not decode the image ({rc})")
                n_past = int(new_n_past.value)
            return n_past
        finally:
            m.mtmd_input_chunks_free(chunks)

    def _check_fits(self, m, chunks, n_chunks: int, reserve: int) -> None:
        """A prompt and reply longer than the context fail inside llama_decode with only "failed to
        find a memory slot"; say what did not fit instead."""
        sizes = [m.mtmd_input_chunk_get_n_tokens(m.mtmd_input_chunks_get(chunks, i)) for i in range(n_chunks)]
        n_ctx = self.llm.n_ctx()
        if sum(sizes) + reserve > n_ctx:
            raise QoqoptError(f"the prompt is {sum(sizes)} tokens (text and image) and the reply up to {reserve}, "
                              f"but the context holds {n_ctx}: shorten the question or the reply")  # fmt: skip

    def _run_batch(self, ids: list[int], n_past: int, all_logits: bool) -> None:
        lc = self._llama_cpp
        batch = lc.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or i == len(ids) - 1
            with deferred_signals():
                rc = lc.llama_decode(self.llm.ctx, batch)
            if rc != 0:
                raise _ERRORS.error("llama_decode failed")
        finally:
            lc.llama_batch_free(batch)

    def _logits_view(self, i: int) -> np.ndarray:
        """Output ``i``'s logits (-1: the last) as llama.cpp holds them: valid until its next decode."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _greedy(self) -> int:
        """The last output's greedy token, read in place: a copy of the 152k-float row cost more than
        the argmax (163 µs against 50 a token, helper-94), time that bench's decode rate counted."""
        return int(np.argmax(self._logits_view(-1)))

    def chat_logits(self, prompt: str, image, continuation: list[int], image_key=None) -> np.ndarray:
        """Logits predicting each token of `continuation` (teacher-forced) after an image prompt.

        Row 0 predicts continuation[0] (from the prompt's last position), row i predicts continuation[i].
        `image_key` names the image in `embd_cache`, so several builds sharing one mmproj encode it once.
        """
        n_past = self._eval_prompt(prompt, [image] if image is not None else [], [image_key] if image is not None else None,
                                   reserve=max(len(continuation) - 1, 0))
        out = np.empty((max(len(continuation), 1), self.n_vocab), dtype=np.float32)  # each row copied once
        out[0] = self._logits_view(-1)
        if len(continuation) > 1:
            self._run_batch(continuation[:-1], n_past, True)
            for i in range(len(continuation) - 1):
                out[i + 1] = self._logits_view(i)
        return out

    def generate(self, prompt: str, image=None, max_tokens: int = 48, stop_ids: tuple[int, ...] = (151645, 151643),
                 image_key=None) -> str:  # fmt: skip
        """Greedy continuation of an (image) prompt, as llama.cpp produces it (`image_key`: see chat_logits)."""
        n_past = self._eval_prompt(prompt, [image] if image is not None else [], [image_key] if image is not None else None,
                                   reserve=max_tokens)
        tok, out = self._greedy(), []
        with deferred_signals() as stop:  # held once for the loop, and checked between tokens
            for _ in range(max_tokens):
                if tok in stop_ids or stop:
                    break
                out.append(tok)
                self._run_batch([tok], n_past, False)
                tok, n_past = self._greedy(), n_past + 1
        return self.detokenize(out)

    def profile(self, prompt: str, image, n_decode: int) -> dict:
        """Wall-clock seconds of one request, as a user would see it: time to first token (image
        preprocessing and encode + prompt decode + first logits), the image's share of it, and
        `n_decode` greedy tokens (stop tokens ignored, so every run decodes the same length)."""
        t0 = time.perf_counter()
        n_past = self._eval_prompt(prompt, [image] if image is not None else [], reserve=n_decode)
        tok = self._greedy()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        n_prompt = self.last_prompt_tokens
        with deferred_signals() as stop:  # held once: per token, the handler swaps cost more than the argmax
            for _ in range(n_decode):
                if stop:
                    break
                self._run_batch([tok], n_past, False)
                tok, n_past = self._greedy(), n_past + 1
        decode = time.perf_counter() - t1
        # prefill: the prompt's decode (text and image embeddings) and its logits, as llama.cpp counts
        # its own prompt eval (t_p_eval agreed within 1%)
        return {"encode_s": self.last_encode_s, "ttft_s": ttft, "prefill_s": ttft - self.last_encode_s, "decode_s": decode,
                "n_prompt": n_prompt, "n_image_tokens": self.last_image_tokens}  # fmt: skip


def trained_context(kv: dict) -> int | None:
    """The context a GGUF's model was trained for (``<arch>.context_length``); None where it is not said."""
    n = kv.get(f"{kv.get('general.architecture')}.context_length")
    return n if isinstance(n, int) and n > 0 else None


def context_size(trained: int | None, needed: int, least: int = 0) -> int:
    """llama.cpp's n_ctx for chats of up to ``needed`` tokens: whole 256-token steps, at least
    ``least``, and never past ``trained`` (:func:`trained_context`): llama.cpp would place positions
    past those the model learned without a word. Whether a chat fits is the caller's to say."""
    want = max(least, -(-needed // 256) * 256)
    return min(want, trained) if trained else want


def gpu_offload_available() -> bool:
    """Whether this llama-cpp-python build can run layers on a GPU (CUDA/Metal/Vulkan builds)."""
    import llama_cpp

    _route_log()  # asking starts the GPU backends, whose start-up lines are not the user's
    return bool(llama_cpp.llama_supports_gpu_offload())


# ggml_log_level, as the compiled-in ggml.h numbers it (llama-cpp-python's _logger.py comment still
# lists an older numbering, in which 3 was ERROR): 3 is WARN, 4 ERROR; 5 continues the last message.
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5


class _ErrorLog:
    """Where mtmd/clip and llama.cpp log once an mmproj is loaded: errors, with their continuations,
    are kept for the next QoqoptError (one line, saying what llama.cpp said); the rest is dropped.

    The rest is noise here: tensor listings, and a warning that Qwen-VL grounding wants at least 1024
    image tokens, while QoQ-Med is run at its training range (84-668 tokens) on purpose.
    """

    KEEP = 8  # lines: the last error and its continuations

    def __init__(self):
        self.lines: list[str] = []
        self._keeping = False

    def write(self, level: int, text: str) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            self._keeping = level == GGML_LOG_LEVEL_ERROR
        if self._keeping:  # one message may hold several lines ("...mismatch...\nhint: ...")
            self.lines = [*self.lines, *(ln.strip() for ln in text.splitlines() if ln.strip())][-self.KEEP :]

    def clear(self) -> None:
        self.lines = []

    def error(self, message: str) -> QoqoptError:
        """``message``, plus what llama.cpp logged as errors since the last one; clears the log."""
        said, self.lines = " ".join(self.lines), []
        return QoqoptError(f"{message} (llama.cpp: {said})" if said else message)


_ERRORS = _ErrorLog()


@contextmanager
def _model_params(llama_cpp, **fields):
    """llama-cpp-python's Llama takes no argument for some of llama.cpp's model parameters
    (use_extra_bufts): the Llama made inside gets the defaults with ``fields`` set."""
    if not fields:
        yield
        return
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


BUFFERS = BufferLog()  # what the llama.cpp of the last LlamaVL allocated (one is open at a time)


def _log_callback():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def read_log(level, text, user_data):
        said = text.decode("utf-8", "replace")
        _ERRORS.write(level, said)
        BUFFERS.write(said)

    return read_log


_LOG_CALLBACK = None


def _route_log() -> None:
    """Route llama.cpp's log to _ERRORS and BUFFERS (llama-cpp-python's own logger drops it when not
    verbose, or prints it)."""
    import llama_cpp

    global _LOG_CALLBACK
    _LOG_CALLBACK = _LOG_CALLBACK or _log_callback()  # kept alive: llama.cpp holds a raw pointer
    llama_cpp.llama_log_set(_LOG_CALLBACK, None)
