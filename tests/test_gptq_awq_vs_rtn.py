"""GPTQ and AWQ beat round-to-nearest on the trained mini QoQ-Med, on real clinical activations.

Same bits (4) and group size (128) throughout. GPTQ is compared with symmetric RTN (GPTQ's default
here), AWQ with zero-point RTN (AWQ's format). Two measures:
  * per-layer output error, captured while streaming the layers on clinical calibration chats;
  * mean KLD of the next-token distribution at every position of 15 balanced held-out clinical
    evaluation chats (image prompt + reference answer), against the unquantized model
    (drift.position_stats, llama-perplexity's definition); the answer tokens alone are reported too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qoqopt.bench.machine import threads_or_default
from qoqopt.exports.hf_quant import DEFAULT_ORDER, GPTQ_ORDERS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONFIGS = {  # label -> (method, symmetric, other QuantizeOptions)
    "rtn-sym": ("rtn", True, {}),
    "gptq": ("gptq", True, {}),
    "gptq-gar": ("gptq", True, GPTQ_ORDERS["group-aware"]),  # GPTQModel's default visiting order
    "gptq-default": ("gptq", True, GPTQ_ORDERS[DEFAULT_ORDER]),  # the export's default, as it passes it
    "rtn-asym": ("rtn", False, {}),
    "awq": ("awq", False, {}),
}


@pytest.fixture(scope="module")
def runs(trained_dir):
    from qoqopt.calibration import calibration_items
    from qoqopt.loader import open_checkpoint
    from qoqopt.processor import load_processor
    from qoqopt.quantize.rtn import QuantSpec
    from qoqopt.quantize.runner import QuantizeOptions, capture_layer0_inputs, encode_chats, stream_quantize

    ckpt = open_checkpoint(str(trained_dir))
    items, _ = calibration_items("clinical", 8, seed=0)
    captured = capture_layer0_inputs(ckpt, encode_chats(load_processor(trained_dir), items), progress=False)
    assert captured.image_tokens > 0
    out = {}
    for label, (method, sym, extra) in CONFIGS.items():
        opts = QuantizeOptions(method=method, spec=QuantSpec(4, 128, sym=sym), **extra)
        out[label] = list(stream_quantize(ckpt, captured, opts, log=lambda m: None))
    return out


def test_layer_output_error_beats_rtn(runs):
    errors = {label: [r.rel_error for r in results] for label, results in runs.items()}
    print("\nper-layer relative output error:", {k: [round(e, 4) for e in v] for k, v in errors.items()})
    for i in range(len(errors["gptq"])):
        assert errors["gptq"][i] < errors["rtn-sym"][i], errors
        assert errors["awq"][i] < errors["rtn-asym"][i], errors
        # GAR's visiting order, same layout: measured 0.0135 -> 0.0115 and 0.0098 -> 0.0072. The end-to-end
        # KLD moves less on this 2-layer model (every position 3.61e-4 vs 3.60e-4; answer tokens 1.12e-5
        # vs 1.16e-5); benchmarks/bench_vs_gptqmodel.py measures it on more calibration chats.
        assert errors["gptq-gar"][i] < errors["gptq"][i], errors
        # act-order across the whole matrix with static groups: lower again, in the same plain layout
        assert errors["gptq-default"][i] < errors["gptq-gar"][i], errors


def _layer_state(results) -> dict[str, torch.Tensor]:
    state = {}
    for r in results:
        prefix = f"{r.index}."
        for name, qw in r.quantized.items():
            state[f"{prefix}{name}.weight"] = qw.dequantize()
        for name, t in r.tensors.items():
            state[prefix + name] = t.float()
    return state


def test_model_output_kld_beats_rtn(runs, trained_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.calibration import encode_chat
    from qoqopt.data import balanced_sample, clinical_set
    from qoqopt.drift import position_stats, summarize_positions
    from qoqopt.processor import load_processor

    # this worker's share of the cores (all of them without xdist; one_thread restores its setting
    # after the test): 105 forwards whose cost is the 152k-wide lm_head GEMM, which threads well,
    # unlike the small-tensor loops of `runs`. More threads than the share spin against the other
    # worker's (OpenMP threads wait for a core by spinning)
    torch.set_num_threads(threads_or_default(0))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(trained_dir), dtype=torch.float32).eval()
    layers = model.model.language_model.layers
    reference = {k: v.clone() for k, v in layers.state_dict().items()}
    states = {label: _layer_state(results) for label, results in runs.items()}
    for s in states.values():
        assert set(s) == set(reference)
    proc = load_processor(trained_dir)
    items = balanced_sample(clinical_set("eval", n_per_base=1), 15, seed=0)
    every = {label: [] for label in states}  # every position of the chat, as llama-perplexity scores
    answer = {label: [] for label in states}  # only the positions that predict the reference answer
    with torch.no_grad():
        for item in items:
            batch = encode_chat(proc, item, with_answer=True)
            reply = len(proc.tokenizer(item.target_text() + "<|im_end|>").input_ids)
            targets = batch["input_ids"][0, 1:].numpy()
            layers.load_state_dict(reference)
            ref = model(**batch).logits[0, :-1].numpy()
            for label, state in states.items():
                layers.load_state_dict(state)
                cand = model(**batch).logits[0, :-1].numpy()
                every[label].append(position_stats(ref, cand, targets))
                answer[label].append(position_stats(ref[-reply:], cand[-reply:], targets[-reply:]))

    def pooled(stats):
        return {k: summarize_positions({f: np.concatenate([s[f] for s in st]) for f in st[0]}) for k, st in stats.items()}

    every, answer = pooled(every), pooled(answer)
    print("\nmean KLD, 15 eval chats, every position:",
          {k: (f"{v.mean_kld:.3g}", f"top1 {v.same_top_pct:.2f}%") for k, v in every.items()})  # fmt: skip
    print("mean KLD, answer tokens only:", {k: f"{v.mean_kld:.3g}" for k, v in answer.items()})
    assert every["gptq"].mean_kld < every["rtn-sym"].mean_kld
    assert answer["gptq"].mean_kld < answer["rtn-sym"].mean_kld
    # AWQ against zero-point RTN is close on this 2-layer model, and which positions it wins flips
    # with the trained model: every position 2.6e-3 vs 4.1e-3 but answer tokens 3.95e-5 vs 3.29e-5
    # on one; every position 4.32e-3 vs 4.26e-3 but answer tokens 3.32e-5 vs 5.1e-5 on the model an
    # AVX2-only CPU trains. It has to win on one of the two, never lose both.
    assert every["awq"].mean_kld < every["rtn-asym"].mean_kld or answer["awq"].mean_kld < answer["rtn-asym"].mean_kld
