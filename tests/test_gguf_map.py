"""The GGUF name table against the real QoQ-Med-VL-7B index (868 names, meta-device shapes) and gguf-py."""

import numpy as np
import pytest

from qoqopt.errors import QoqoptError
from qoqopt.exports import gguf_map, gguf_meta, gguf_write
from qoqopt.exports.gguf_map import build_mapping
from qoqopt.loader import canonical_name, open_checkpoint


@pytest.fixture(scope="module")
def real_7b(fixture_7b):
    ckpt = open_checkpoint(str(fixture_7b), weights=False)
    meta = ckpt.expected_shapes()
    # ECG tensors have no meta shape (transformers' class has no ECG encoder); they are skipped anyway
    shapes = {name: meta.get(name, (1,)) for name in ckpt.names}
    return ckpt, shapes


def test_real_7b_maps_like_llama_cpp_converter(real_7b):
    ckpt, shapes = real_7b
    assert len(shapes) == 868
    text_hp, vision_hp = gguf_meta.text_hparams(ckpt.config), gguf_meta.vision_hparams(ckpt.config)
    m = build_mapping(shapes, text_hp.n_layers, vision_hp.depth)
    # llama.cpp's convert_hf_to_gguf.py gives the 7B 339 text and 519 mmproj tensors
    assert len(m.text) == 339 and len(m.vision) == 519
    assert {e.source for e in m.text} == {n for n in shapes if n.startswith(("model.", "lm_head."))}
    assert {e.source for e in m.vision} == {n for n in shapes if n.startswith("visual.")}  # all 390
    assert list(m.skipped.values()) == [sorted(n for n in shapes if n.startswith("time_series_embedding."))]
    assert len(next(iter(m.skipped.values()))) == 139
    assert m.skip_summary()[0].startswith("139 tensor(s) time_series_embedding.*: QoQ-Med's ECG encoder")
    assert len({e.target for e in m.text}) == 339 and len({e.target for e in m.vision}) == 519
    by_target = {e.target: e for e in m.text + m.vision}
    assert by_target["token_embd.weight"].shape == (152064, 3584)
    assert by_target["output.weight"].source == "lm_head.weight"
    # the Conv3d patch embedding becomes two Conv2d kernels; qkv becomes q, k, v
    assert by_target["v.patch_embd.weight"].shape == by_target["v.patch_embd.weight.1"].shape == (1280, 3, 14, 14)
    assert [by_target[f"v.blk.31.attn_{x}.weight"].shape for x in "qkv"] == [(1280, 1280)] * 3
    assert [by_target[f"v.blk.0.attn_{x}.bias"].index for x in "qkv"] == [0, 1, 2]
    assert by_target["mm.0.weight"].shape == (5120, 5120) and by_target["mm.2.weight"].shape == (3584, 5120)
    assert by_target["v.post_ln.weight"].source == "visual.merger.ln_q.weight"
    # file order: embeddings, blocks in order, then the head
    assert m.text[0].target == "token_embd.weight" and m.text[-1].target == "output.weight"
    assert m.vision[0].target == "v.patch_embd.weight" and m.vision[-1].target == "mm.2.bias"


def test_real_7b_hparams_and_plan(real_7b):
    ckpt, shapes = real_7b
    hp, vhp = gguf_meta.text_hparams(ckpt.config), gguf_meta.vision_hparams(ckpt.config)
    assert (hp.hidden, hp.intermediate, hp.n_layers, hp.heads, hp.kv_heads) == (3584, 18944, 28, 28, 4)
    assert hp.mrope_section == (16, 24, 24) and hp.rope_theta == 1e6 and hp.vocab_size == 152064
    assert (vhp.depth, vhp.hidden, vhp.intermediate, vhp.heads, vhp.n_wa_pattern) == (32, 1280, 3420, 16, 8)
    assert gguf_meta.train_token_range(vhp) == (84, 668)
    m = build_mapping(shapes, hp.n_layers, vhp.depth)
    f16 = gguf_write.plan_tensors(m.text, "F16", mmproj=False)
    assert sum(p.nbytes for p in f16) == pytest.approx(15.24e9, rel=0.01)  # the 7B's F16 GGUF
    # a Q8_0 mmproj: the vision MLP's 3420-wide rows are not a multiple of 32 -> F16, said per tensor
    q8 = gguf_write.plan_tensors(m.vision, "Q8_0", mmproj=True)
    fallbacks = [p for p in q8 if p.note]
    assert len(fallbacks) == 32 and all(p.entry.target.endswith("ffn_down.weight") for p in fallbacks)
    assert {p.qtype for p in q8 if p.entry.target.startswith("v.patch_embd")} == {gguf_write.F32}


def test_every_tensor_gets_gguf_pys_name_for_it(real_7b):
    """Each source tensor's target is the name gguf-py's own tensor map gives that tensor (the table
    llama.cpp's converter maps by), so a swapped pair of rules (gate and up, say) fails here. Two
    places differ by design, as in llama.cpp's converter: the fused vision qkv is split into q, k and
    v in order, and the Conv3d patch embedding into two Conv2d kernels, the second named ``.weight.1``."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    ckpt, shapes = real_7b
    m = build_mapping(shapes, 28, 32)
    for entries, arch, blocks in ((m.text, MODEL_ARCH.QWEN2VL, 28), (m.vision, MODEL_ARCH.MMPROJ, 32)):
        names = get_tensor_name_map(arch, blocks)
        for e in entries:
            want = names.get_name(e.source, try_suffixes=(".weight", ".bias"))
            if ".attn_qkv." in want:
                want = want.replace("attn_qkv", "attn_" + "qkv"[e.index])
            elif want == "v.patch_embd.weight" and e.index:
                want += f".{e.index}"
            assert e.target == want, e.source


def test_gguf_names_are_llama_cpp_names():
    from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    def names(arch):  # gguf-py's templates with block ids 0..2 filled in
        return {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(3)}

    text, vision = names(MODEL_ARCH.QWEN2VL), names(MODEL_ARCH.MMPROJ)
    for rule in gguf_map.RULES:
        for target in rule.targets:
            stem = target.replace(".weight.1", ".weight").rsplit(".", 1)[0].format(bid=0)
            assert stem in (text if rule.part == gguf_map.TEXT else vision), target


def test_both_key_layouts_map_the_same(real_7b):
    """transformers' own renaming of legacy keys at load (its conversion mapping for
    Qwen2_5_VLForConditionalGeneration) gives the runtime layout's names; canonical_name takes each
    of the 7B's 868 back to its legacy name, the one the GGUF table maps."""
    import re

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    ckpt, _ = real_7b
    renamings = [(source, target) for r in get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration")
                 for source, target in zip(r.source_patterns, r.target_patterns)]  # fmt: skip

    def runtime(name):
        for source, target in renamings:
            name = re.sub(source, target, name)
        return name

    renamed = {runtime(n): n for n in ckpt.names}
    assert len(renamed) == len(ckpt.names) == 868
    assert sum(r != n for r, n in renamed.items()) == 868 - 1 - 139  # all but lm_head and the ECG encoder's
    assert {r: canonical_name(r) for r in renamed} == renamed


def _tiny_shapes():
    shapes = {
        "model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4),
        "visual.patch_embed.proj.weight": (8, 3, 2, 14, 14), "visual.merger.ln_q.weight": (8,),
        "visual.merger.mlp.0.weight": (32, 32), "visual.merger.mlp.0.bias": (32,),
        "visual.merger.mlp.2.weight": (4, 32), "visual.merger.mlp.2.bias": (4,),
    }  # fmt: skip
    for rule in gguf_map.RULES:
        if rule.per_block:
            shapes[rule.source.format(bid=0)] = (12, 4) if ".qkv." in rule.source else (4, 4)
    return shapes


def test_unmapped_or_missing_tensors_fail_loudly():
    shapes = _tiny_shapes()
    assert len(build_mapping(shapes, 1, 1).vision) == 23
    with pytest.raises(QoqoptError, match=r"1 tensor\(s\) have no GGUF mapping: model.layers.0.mlp.extra.weight"):
        build_mapping({**shapes, "model.layers.0.mlp.extra.weight": (4, 4)}, 1, 1)
    missing = {k: v for k, v in shapes.items() if not k.startswith("visual.")}
    with pytest.raises(QoqoptError, match=r"checkpoint lacks \d+ tensor\(s\) GGUF needs: visual.patch_embed"):
        build_mapping(missing, 1, 1)
    with pytest.raises(QoqoptError, match="lacks 12 tensor"):
        build_mapping(shapes, 2, 1)  # config says 2 layers, checkpoint has 1
    with pytest.raises(QoqoptError, match="beyond the configured layer count"):
        build_mapping({**shapes, "model.layers.5.mlp.up_proj.weight": (4, 4)}, 1, 1)
    assert list(build_mapping({**shapes, "time_series_embedding.proj.weight": (4, 4)}, 1, 1).skipped.values()) == [
        ["time_series_embedding.proj.weight"]
    ]


def test_window_pattern_must_be_periodic():
    base = {"depth": 8, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 4}
    assert gguf_meta.vision_hparams({"vision_config": {**base, "fullatt_block_indexes": [3, 7]}}).n_wa_pattern == 4
    with pytest.raises(QoqoptError, match=r"not one block in every 3"):
        gguf_meta.vision_hparams({"vision_config": {**base, "fullatt_block_indexes": [2, 7]}})


def test_kv_keys_llama_cpp_reads(real_7b, tmp_path):
    """The hyperparameter keys as written (a header-only file: fast to read back)."""
    from gguf import GGUFReader, GGUFWriter

    ckpt, _ = real_7b
    hp, vhp = gguf_meta.text_hparams(ckpt.config), gguf_meta.vision_hparams(ckpt.config)
    for arch, add in [("qwen2vl", lambda w: gguf_meta.add_text_hparams(w, hp)),
                      ("clip", lambda w: gguf_meta.add_vision_hparams(w, vhp, hp.hidden, gguf_meta.image_norm(ckpt.path)))]:  # fmt: skip
        w = GGUFWriter(path=None, arch=arch)
        add(w)
        w.write_header_to_file(path=tmp_path / f"{arch}.gguf")
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
    def val(field):
        values = [field.parts[i][0] for i in field.data]
        return values if len(values) > 1 else values[0]

    t = GGUFReader(str(tmp_path / "qwen2vl.gguf")).fields
    assert val(t["qwen2vl.rope.dimension_sections"]) == [16, 24, 24, 0]
    assert val(t["qwen2vl.attention.head_count_kv"]) == 4
    assert val(t["qwen2vl.rope.freq_base"]) == 1e6
    assert val(t["qwen2vl.context_length"]) == 128000
    v = GGUFReader(str(tmp_path / "clip.gguf")).fields
    assert bytes(v["clip.projector_type"].parts[-1]).decode() == "qwen2.5vl_merger"
    for key, want in [("clip.vision.n_wa_pattern", 8), ("clip.vision.block_count", 32), ("clip.vision.embedding_length", 1280),
                      ("clip.vision.feed_forward_length", 3420), ("clip.vision.projection_dim", 3584),
                      ("clip.vision.image_min_pixels", 65536), ("clip.vision.image_max_pixels", 524288)]:  # fmt: skip
        assert val(v[key]) == want, key
    assert np.allclose(val(v["clip.vision.image_mean"]), [0.48145466, 0.4578275, 0.40821073])
