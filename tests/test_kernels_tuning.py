"""Per-GPU W4A16 decode tuning: the tables (qoqopt.kernels.tuning), the launches that read them, and
the tuner that writes them (benchmarks/tune_w4a16.py, on the CPU through the Triton interpreter)."""

from __future__ import annotations

import json

import pytest
import torch

from qoqopt.errors import QoqoptError
from qoqopt.kernels import tuning

GATE_UP = dict(words="fragments", bits=4, group_size=128, k=3584, n=18944, dtype="bfloat16")
FRAG_1 = dict(KERNEL="frag", BLOCK_N=64, num_warps=2, num_stages=4, SPLIT_K=2)
FRAG_16 = dict(KERNEL="frag", BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=3)
H200 = "NVIDIA H200"


def _entry(m: int, config: dict, **key) -> dict:
    return {**GATE_UP, **key, "m": m, "config": config}


def _write(folder, device: str, entries: list[dict]):
    path = folder / tuning.file_name(device)
    tuning.write_table(path, device, entries, {})
    return path


def _lookup(m: int, device: str = H200, **layer):
    return tuning.lookup(device, **{**GATE_UP, "dtype": torch.bfloat16, **layer, "m": m})


@pytest.fixture
def tables_in(tmp_path, monkeypatch):
    """Tables looked up in a temporary folder, then an empty cache and an empty shipped folder."""
    monkeypatch.setenv("QOQOPT_KERNEL_TUNING", str(tmp_path / "env"))
    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "SHIPPED", tmp_path / "shipped")
    (tmp_path / "env").mkdir()
    tuning.forget()
    yield tmp_path / "env"
    tuning.forget()


def test_table_file_is_named_after_the_device():
    assert tuning.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert tuning.file_name("NVIDIA GeForce RTX 4090") == "NVIDIA_GeForce_RTX_4090.json"


def test_a_table_serves_one_row_from_its_one_row_entry_and_more_rows_from_the_fewest_that_cover(tables_in):
    path = _write(tables_in, H200, [_entry(1, FRAG_1), _entry(16, FRAG_16), _entry(4, FRAG_1, dtype="float16")])
    assert _lookup(1).config == FRAG_1 and _lookup(1).source == path
    assert all(_lookup(m).config == FRAG_16 for m in range(2, 17))
    assert _lookup(17) is None  # prefill sizes are never tuned
    # fp16: tuned at 4 rows, which serves 2 to 4; one row was not tuned, so the rules run it
    assert [_lookup(m, dtype=torch.float16) is not None for m in (1, 2, 4, 5)] == [False, True, True, False]
    # another layer, layout, group size or GPU: the rules decide
    assert _lookup(1, n=512) is None and _lookup(1, words="gptq") is None and _lookup(1, group_size=64) is None
    assert _lookup(1, device="NVIDIA H100 80GB HBM3") is None


def test_where_the_rules_won_a_table_says_so_and_the_rules_run(tables_in):
    gemv = dict(KERNEL="gemv", BLOCK_N=512, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=7)
    _write(tables_in, H200, [_entry(1, None), _entry(16, FRAG_16), _entry(1, gemv, words="gptq", n=512)])
    assert _lookup(1) is None and _lookup(16).config == FRAG_16
    assert _lookup(1, words="gptq", n=512).config == gemv
    assert _lookup(2, words="gptq", n=512) is None  # the GEMV takes one row


def test_tables_are_looked_up_in_the_env_folder_then_the_cache_then_the_shipped_folder(tables_in, monkeypatch):
    root = tables_in.parent
    _write(tuning.SHIPPED, H200, [_entry(1, FRAG_16), _entry(16, FRAG_16), _entry(1, FRAG_16, n=512)])
    assert _lookup(1).config == FRAG_16
    _write(tuning.user_dir(), H200, [_entry(1, FRAG_1)])
    tuning.forget()
    assert _lookup(1).config == FRAG_1 and _lookup(1).source.is_relative_to(root / "cache")
    # the first table holding a layer decides all its row counts: no 16-row entry there, the rules
    assert _lookup(16) is None
    _write(tables_in, H200, [_entry(1, dict(FRAG_1, num_stages=5))])
    tuning.forget()
    assert _lookup(1).config["num_stages"] == 5
    assert _lookup(1, n=512).config == FRAG_16  # a layer the earlier tables lack: the shipped one's
    monkeypatch.setenv("QOQOPT_KERNEL_TUNING", "off")
    assert tuning.search_dirs() == [] and _lookup(1) is None
    monkeypatch.setenv("QOQOPT_KERNEL_TUNING", str(root / "no such folder"))
    with pytest.raises(QoqoptError, match="no such folder: not a folder"):
        _lookup(1)


BAD_TABLES = {
    "not JSON": ("{entries", "cannot read it"),
    "another schema": ({"schema": "qoqopt.other/1", "entries": []}, "not a qoqopt.w4a16_tuning/1 table"),
    "prefill kernel": ([_entry(1, dict(KERNEL="dense"))], "is not a decode kernel"),
    "string for an int": ([_entry(1, dict(FRAG_1, BLOCK_N="64"))], "BLOCK_N='64'"),
    "unknown key": ([_entry(1, dict(FRAG_1, maxnreg=128))], "config maxnreg: not one of KERNEL"),
    "not a power of two": ([_entry(1, dict(FRAG_1, BLOCK_N=96))], "BLOCK_N=96: a power of two from 16 to 1024"),
    # a K tile over two groups would read one group's scales for both: wrong results, silently
    "K tile over two groups": ([_entry(16, dict(KERNEL="mma", BLOCK_K=256), words="gptq")],
                               "BLOCK_K=256 does not divide group_size 128"),
    "config neither object nor null": ([dict(_entry(1, FRAG_1), config=[1])], "config is an object, or null"),
    "words it does not read": ([_entry(1, FRAG_1, words="gptq")], "does not read the gptq words"),
    "half-depth dots below 64 rows": ([_entry(1, dict(FRAG_1, DOT_K=32))], "DOT_K=32: a power of two from 64 to 128"),
    "half-depth dots outside the fragment kernel": ([_entry(16, dict(KERNEL="mma", DOT_K=64), words="gptq")],
                                                    "config DOT_K: the fragment decode kernel's"),
    "GEMV at 16 rows": ([_entry(16, dict(KERNEL="gemv"), words="gptq")], "tuned at m 1 only"),
    "zero rows": ([_entry(0, FRAG_1)], "m 0 is not a positive integer"),
    "prefill rows": ([_entry(32, FRAG_1)], "m at most 16"),
    "bool for bits": ([_entry(1, FRAG_1, bits=True)], "bits True is not a positive integer"),
    "missing n": ([{k: v for k, v in _entry(1, FRAG_1).items() if k != "n"}], "missing n"),
    "twice the same launch": ([_entry(1, FRAG_1), _entry(1, FRAG_16)], "repeats fragments words 3584->18944"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_table_is_a_one_line_error_that_names_its_file(tables_in, case):
    content, expected = BAD_TABLES[case]
    if isinstance(content, list):
        content = {"schema": tuning.SCHEMA, "device": H200, "entries": content}
    path = tables_in / tuning.file_name(H200)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(QoqoptError) as err:
        _lookup(1)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_write_table_checks_entries_and_keeps_an_existing_table(tables_in):
    path = _write(tables_in, H200, [_entry(1, FRAG_1)])
    with pytest.raises(QoqoptError, match="exists"):
        tuning.write_table(path, H200, [_entry(1, FRAG_16)], {})
    with pytest.raises(QoqoptError, match="entry 0: .*not a decode kernel"):
        tuning.write_table(path, H200, [_entry(1, dict(KERNEL="dense"))], {}, force=True)
    with pytest.raises(QoqoptError, match="fragments words 3584->18944 .* M=1 given twice"):
        tuning.write_table(path, H200, [_entry(1, FRAG_1), _entry(1, None)], {}, force=True)
    assert tuning.read_table(path)[tuning.Key(**{**GATE_UP, "m": 1})] == FRAG_1
    assert sorted(p.name for p in tables_in.iterdir()) == [path.name]  # no temporary left behind


def test_tables_for_a_device_are_read_on_cuda_only(tables_in, monkeypatch):
    path = _write(tables_in, H200, [_entry(1, FRAG_1)])
    monkeypatch.setattr(tuning, "device_name", lambda device: H200)
    assert tuning.tables_for(torch.device("cuda", 0)) == [path]
    assert tuning.tables_for(torch.device("cpu")) == []
    from qoqopt.kernels.registry import PatchReport

    report = PatchReport(counts={"w4a16": 7}, backend="triton", w4a16_tuning=[str(path)])
    assert f"W4A16 decode tuning table for this GPU: {path}" in str(report)


# ----------------------------------------------------------------------------- launches


@pytest.fixture
def offline(monkeypatch):
    """W4A16 launches planned for an H200-sized GPU with CPU stand-ins (benchmarks/offline_compile)."""
    if torch.cuda.is_available():
        pytest.skip("offline planning stubs Triton's driver: for CPU-only machines")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from benchmarks import offline_compile

    return offline_compile


def test_a_gpus_table_sets_its_decode_launches_and_the_rules_set_the_rest(tables_in, offline):
    from qoqopt.kernels import w4a16

    config = dict(FRAG_1, DOT_K=64)  # two 64-row dots a K step: the compiled half-block pairs too
    _write(tables_in, offline.OFFLINE_DEVICE, [_entry(1, config)])
    layer = (3584, 18944, torch.bfloat16, offline.CUDA, False, 4, 128, 1)  # K, N, dtype, device, bias, bits, group, v1
    with offline.offline_w4a16():
        tuned, ruled = (w4a16.shared_launch(m, *layer, fragments=True).matmul for m in (1, 16))
        rules = w4a16.launch_plan(16, 18944, 3584, bits=4, group_size=128, zero_offset=1, has_bias=False,
                                  dtype=torch.bfloat16, device=offline.CUDA, KERNEL="frag")
    assert tuned.grid == (1, 18944 // 64, 2)
    assert {k: tuned.constexprs[k] for k in ("BLOCK_N", "num_warps", "num_stages", "SPLIT_K", "DOT_K")} == \
        {k: v for k, v in config.items() if k != "KERNEL"}
    assert (tuned.constexprs["ASM_LO"], tuned.constexprs["ASM_HI"]) == w4a16.FRAGMENT_HALF_ASM[torch.bfloat16]
    assert (ruled.grid, ruled.constexprs) == (rules.grid, rules.constexprs)


def test_a_tuned_config_that_does_not_fit_its_layer_names_the_table(tables_in, offline):
    from qoqopt.kernels import w4a16

    # fragment words decode 16-bit activations only: the plan refuses fp32 (checked when it plans)
    path = _write(tables_in, offline.OFFLINE_DEVICE, [_entry(16, FRAG_16, dtype="float32")])
    with offline.offline_w4a16(), pytest.raises(QoqoptError) as err:
        w4a16.shared_launch(16, 3584, 18944, torch.float32, offline.CUDA, False, 4, 128, 1, fragments=True)
    assert str(path) in str(err.value) and "QOQOPT_KERNEL_TUNING=off" in str(err.value)


# ----------------------------------------------------------------------------- the tuner


@pytest.fixture
def tuner(monkeypatch, tables_in):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CPU path of the tuner (interpreter); on a GPU benchmarks/gpu_check.sh runs it")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks import tune_w4a16

    return tune_w4a16


def test_the_tuner_refuses_with_one_line(tuner, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert tuner.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: tune_w4a16 needs a CUDA GPU: timings on a CPU mean nothing\n"
    for args, expected in ((["--shapes", "gate,qkvo"], "unknown shape 'qkvo'"), (["--m", "17"], "--m 17"),
                           (["--force", "--out", str(out), "--m", "1", "0"], "--m 0")):
        assert tuner.main(["--allow-cpu", *args]) == 2
        assert expected in capsys.readouterr().err
    out.write_text("{}")
    assert tuner.main(["--allow-cpu", "--out", str(out)]) == 2
    assert "exists (--force replaces it)" in capsys.readouterr().err and out.read_text() == "{}"


def _fake_times(monkeypatch, tuner, times: list[float]):
    it = iter(times)
    monkeypatch.setattr(tuner, "time_us", lambda fn: next(it))


def test_the_tuner_keeps_the_fastest_candidate_and_its_table_computes_the_product(tuner, tables_in, monkeypatch):
    from benchmarks.spec_layout import spec_dequantize
    from qoqopt.kernels.w4a16 import w4a16_matmul
    from qoqopt.packing import gptq_to_fragments, pack_gptq, quantize_rtn

    picks = [dict(KERNEL="frag", BLOCK_N=64, num_warps=2, num_stages=3, SPLIT_K=2),
             dict(KERNEL="frag", BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=2),
             dict(KERNEL="frag", BLOCK_N=128, num_warps=4, num_stages=3, SPLIT_K=1)]
    monkeypatch.setattr(tuner, "candidates", lambda *args: picks)
    # the rules, each candidate, then the best against the rules in turn, twice
    _fake_times(monkeypatch, tuner, [10.0, 9.9, 4.0, 6.0, 10.1, 4.2, 9.9, 4.1])
    out = tables_in.parent / "tuned.json"
    assert tuner.main(["--allow-cpu", "--model", "tiny", "--shapes", "gate_up", "--m", "1", "--dtype", "float16",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["model"] == "tiny"
    [entry] = doc["entries"]
    assert (entry["config"], entry["us"], entry["default_us"], entry["m"]) == (picks[1], 4.1, 9.9, 1)
    # what the table says to launch computes a layer of that shape's product: the weight's integers
    # dequantized as the GPTQ spec states (benchmarks/spec_layout), not read back from the packed words
    k, n = entry["k"], entry["n"]
    intweight, zeros, scales = quantize_rtn(torch.randn(n, k) * 0.02, 4, 128)
    qweight, qzeros = pack_gptq(intweight, zeros)
    x = torch.randn(1, k, dtype=torch.float16)
    got = w4a16_matmul(x, gptq_to_fragments(qweight), qzeros, scales, group_size=128, zero_offset=1, **entry["config"])
    want = x.float() @ spec_dequantize(intweight.numpy(), zeros.numpy(), scales, torch.arange(k) // 128).T
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("times", [[10.0, 9.8, 10.0, 9.8, 10.0, 9.8], [10.0, 5.0, 10.0, 9.9, 10.2, 9.95]],
                         ids=["2% faster", "lucky once"])
def test_the_tuner_keeps_the_rules_unless_a_candidate_beats_them_by_min_gain_again(tuner, tables_in, monkeypatch,
                                                                                  times):
    monkeypatch.setattr(tuner, "candidates", lambda *args: [dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                                                                 num_warps=4, num_stages=3, SPLIT_K=1)])
    _fake_times(monkeypatch, tuner, times)
    out = tables_in.parent / "tuned.json"
    assert tuner.main(["--allow-cpu", "--model", "tiny", "--shapes", "k", "--m", "16", "--dtype", "float16",
                       "--out", str(out)]) == 0
    [entry] = json.loads(out.read_text())["entries"]
    assert entry["config"] is None and entry["m"] == 16  # the rules, recorded: this table decides the layer
    assert tuning.read_table(out)[tuning.Key("gptq", 4, 128, 256, 128, "float16", 16)] is None


def test_the_tuner_never_times_one_launch_twice_under_two_names(tuner, tables_in, monkeypatch):
    """The rules' own launch is not a candidate, and two candidates that plan one launch (two K
    splits that round to the same K per split, say) are timed once."""
    from qoqopt.kernels.w4a16 import fragment_launch

    other = dict(KERNEL="frag", BLOCK_N=64, num_warps=2, num_stages=4, SPLIT_K=2)  # gate/up's K: 2 blocks
    monkeypatch.setattr(tuner, "candidates", lambda *args: [fragment_launch(1, torch.float16), other,
                                                           dict(other, SPLIT_K=3)])  # 3 splits of 1 block: 2
    _fake_times(monkeypatch, tuner, [10.0, 20.0])  # the rules' time and one candidate's: a third would fail
    out = tables_in.parent / "tuned.json"
    assert tuner.main(["--allow-cpu", "--model", "tiny", "--shapes", "gate_up", "--m", "1", "1", "--dtype",
                       "float16", "--out", str(out)]) == 0
    [entry] = json.loads(out.read_text())["entries"]  # M = 1 asked twice: tuned once
    assert entry["config"] is None and entry["candidates"] == 1


def test_each_shape_is_tuned_once_and_the_fused_qkv_with_its_bias(tuner):
    import argparse

    # the tiny model's qkv and gate are both 256 -> 512: one table key
    args = argparse.Namespace(model="tiny", shapes="qkv,gate,k", m=[1])
    assert tuner._layers(args) == [("qkv", 256, 512, True), ("k", 256, 128, False)]


def test_every_candidate_of_the_grid_computes_what_the_default_computes(tuner, monkeypatch):
    """The grid's configs (fragment words at gate/up; 16-row tiles and the one-row GEMV over GPTQ
    words at k) all launch and agree with the default: none is rejected or unavailable. (The default
    launches themselves are held to the spec's weights bit for bit in test_kernels.py.)"""
    monkeypatch.setattr(tuner, "time_us", lambda fn: 1.0)  # correctness only
    lines = []
    for shape in ("gate_up", "k"):
        k, n = tuner.layer_shapes("tiny")[shape]
        layer = tuner.Layer(k, n, torch.float16, torch.device("cpu"), 0)
        assert layer.words == ("fragments" if shape == "gate_up" else "gptq")
        tuner.tune_one(layer, 1, 8, quick=False, min_gain=0.03, log=lines.append)
    assert len(lines) > 20 and not [line for line in lines if "rejected" in line or "unavailable" in line]


def test_a_quant_linear_on_a_gpu_runs_its_tables_launch(tables_in):
    """On CUDA (the offline test above covers CPU machines): a layer of a shape the GPU's table names
    launches the table's config and still computes the reference product."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CPU machines: test_a_gpus_table_sets_its_decode_launches_...)")
    from benchmarks.spec_layout import spec_dequantize
    from qoqopt.kernels.w4a16 import QuantLinear
    from qoqopt.packing import pack_gptq, quantize_rtn

    dev, k, n = torch.device("cuda"), 512, 1024
    intweight, zeros, scales = quantize_rtn(torch.randn(n, k, device=dev) * 0.02, 4, 128)
    layer = QuantLinear.from_gptq(*pack_gptq(intweight, zeros), scales)
    assert layer.use_fragment_words()
    _write(tables_in, tuning.device_name(dev), [_entry(1, FRAG_1, k=k, n=n)])
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    y = layer(x)
    launch = layer._launchers[(1, torch.bfloat16, dev, False)].matmul
    assert {key: launch.constexprs[key] for key in ("BLOCK_N", "num_stages", "SPLIT_K")} == \
        dict(BLOCK_N=64, num_stages=4, SPLIT_K=2)
    w = spec_dequantize(intweight.cpu().numpy(), zeros.cpu().numpy(), scales.cpu(), torch.arange(k) // 128)
    torch.testing.assert_close(y.float(), x.float() @ w.to(dev).T, atol=2e-2, rtol=2e-2)


def test_a_k_tile_over_two_groups_is_refused_even_without_asserts():
    """The one config error that would compute wrong results silently is a QoqoptError, not an
    assert (``python -O`` drops those), wherever a config comes from."""
    from qoqopt.kernels.w4a16 import launch_plan

    with pytest.raises(QoqoptError, match="BLOCK_K=256 must divide group_size=128"):
        launch_plan(16, 512, 1024, bits=4, group_size=128, zero_offset=1, has_bias=False, dtype=torch.float16,
                    device=torch.device("cpu"), KERNEL="mma", BLOCK_K=256)
