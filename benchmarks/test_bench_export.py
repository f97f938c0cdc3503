"""Export steps on the tiny mini model (pytest-benchmark groups), each beside its peer:
GGUF F16 write (qoqopt's writer) and llama.cpp's own quantizer on that file; GPTQ vs RTN on one layer."""

import pytest
import torch


@pytest.fixture(scope="module")
def f16_gguf(tiny_dir, tmp_path_factory):
    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf

    out = tmp_path_factory.mktemp("gguf") / "f16"
    res = export_gguf(str(tiny_dir), out, GGUFOptions(quants=["F16"], imatrix="none", name="tiny", progress=False), log=lambda *_: None)
    return res.file("text", "F16")


def test_gguf_export_f16(benchmark, tiny_dir, tmp_path):
    """Whole `qoqopt export --format gguf --quant F16`: text GGUF + mmproj + manifest."""
    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf

    benchmark.group = "gguf export (tiny)"
    runs = iter(range(1000))

    def once():
        out = tmp_path / f"run{next(runs)}"
        export_gguf(str(tiny_dir), out, GGUFOptions(quants=["F16"], imatrix="none", name="tiny", progress=False), log=lambda *_: None)

    benchmark.pedantic(once, rounds=3, iterations=1)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_llama_quantize(benchmark, f16_gguf, quant, tmp_path):
    """llama.cpp's quantizer on qoqopt's F16 file: the step every GGUF build pays per type."""
    from qoqopt.exports.gguf_quant import llama_quantize

    benchmark.group = "gguf quantize (tiny, llama.cpp)"
    benchmark.pedantic(lambda: llama_quantize(f16_gguf, tmp_path / f"{quant}.gguf", quant, None), rounds=3, iterations=1)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_one_layer(benchmark, method):
    """One 7B-shaped projection (3584 -> 3584), group 128, from 512 calibration rows."""
    from qoqopt.quantize.gptq import accumulate_hessian, gptq_quantize
    from qoqopt.quantize.rtn import QuantSpec, rtn_quantize

    benchmark.group = "quantize one 3584x3584 layer"
    torch.manual_seed(0)
    w = torch.randn(3584, 3584) * 0.02
    x = torch.randn(512, 3584)
    h, _ = accumulate_hessian(None, 0, x)
    spec = QuantSpec(bits=4, group_size=128, sym=True)
    fn = (lambda: rtn_quantize(w, spec)) if method == "rtn" else (lambda: gptq_quantize(w, h, spec))
    benchmark.pedantic(fn, rounds=2, iterations=1)
