"""The layer-streaming runner: what it captures equals what transformers feeds decoder layer 0 (3-D
M-RoPE included), a layer loaded alone computes what it computes inside the model, and quantization
reads one layer at a time and never the lm_head."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def setup(tiny_dir):
    from qoqopt.calibration import calibration_items
    from qoqopt.loader import open_checkpoint
    from qoqopt.processor import load_processor
    from qoqopt.quantize.runner import capture_layer0_inputs, encode_chats

    items, _ = calibration_items("clinical", 2, seed=3)
    chats = encode_chats(load_processor(tiny_dir), items)
    ckpt = open_checkpoint(str(tiny_dir))
    return ckpt, chats, capture_layer0_inputs(ckpt, chats, progress=False)


def test_capture_matches_the_full_model(setup, tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.quantize.runner import decoder_config, load_decoder_layer, run_layer

    ckpt, chats, captured = setup
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    layers = model.model.language_model.layers
    seen: dict = {}

    def pre(i):  # hooks must return None, or they replace the layer's inputs / output
        def hook(m, a, k):
            seen.setdefault(f"in{i}", (a[0] if a else k["hidden_states"], k))

        return hook

    def post(i):
        def hook(m, a, k, out):
            seen.setdefault(f"out{i}", out[0] if isinstance(out, tuple) else out)

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(pre(i), with_kwargs=True)
        layer.register_forward_hook(post(i), with_kwargs=True)
    with torch.no_grad():
        model(**chats[0])
    got = captured.inputs[0]
    hidden, kwargs = seen["in0"]
    assert torch.equal(got.hidden, hidden)
    cos, sin = got.kwargs["position_embeddings"]
    assert torch.equal(cos, kwargs["position_embeddings"][0]) and torch.equal(sin, kwargs["position_embeddings"][1])
    # image tokens really have 3-D positions: their (cos, sin) differ from plain 1-D positions'
    rope = model.model.language_model.rotary_emb
    n = hidden.shape[1]
    cos_1d, _ = rope(hidden, torch.arange(n).view(1, 1, -1).expand(3, 1, -1))
    image = chats[0]["mm_token_type_ids"][0].bool()
    assert image.any() and not torch.allclose(cos[0, image], cos_1d[0, image])
    assert torch.allclose(cos[0, :3], cos_1d[0, :3])  # text before the image: 1-D positions
    # each layer, loaded alone from safetensors, computes what it computes inside the model
    x = [got]
    for i in range(len(layers)):
        out = run_layer(load_decoder_layer(ckpt, decoder_config(ckpt, captured), i, "cpu"), x)[0]
        torch.testing.assert_close(out, seen[f"out{i}"], rtol=1e-5, atol=1e-5)
        x = [type(got)(out, got.kwargs)]


def test_streams_one_layer_at_a_time(setup):
    from qoqopt.quantize.rtn import QuantSpec
    from qoqopt.quantize.runner import QuantizeOptions, stream_quantize

    ckpt, _, captured = setup
    read: list[str] = []
    original = type(ckpt).tensor

    def spy(self, name):
        read.append(name)
        return original(self, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(ckpt), "tensor", spy)
        stream = stream_quantize(ckpt, captured, QuantizeOptions("rtn", QuantSpec(4, 128)), log=lambda m: None)
        results = [next(stream)]
        read_by_layer_0 = list(read)  # what was read when layer 0's result came out
        results += list(stream)
    assert [r.index for r in results] == [0, 1]
    assert all(n.startswith("model.layers.") for n in read)  # never lm_head, embeddings or the vision tower
    assert read_by_layer_0 and {int(n.split(".")[2]) for n in read_by_layer_0} == {0}  # layer 1 not read yet
    layer_of = [int(n.split(".")[2]) for n in read]
    assert layer_of == sorted(layer_of)
    assert results[0].rel_error > 0 and set(results[0].quantized) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip
