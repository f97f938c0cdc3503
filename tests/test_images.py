"""A user's image file as the model gets it (qoqopt.images), against transformers' own image loader
and stb_image's rules; llama.cpp's loader is the reference in tests/test_gguf.py. A DICOM file must
give what the training set's DICOM reader gives (qoqopt.data.dicom, held to pydicom in test_data.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from qoqopt.data import catalog
from qoqopt.data.augment import resize_to
from qoqopt.data.dicom import dicom_to_image
from qoqopt.errors import QoqoptError
from tests.conftest import refused
from qoqopt.images import is_dicom, open_image


def _photo_with_orientation(path, orientation: int) -> np.ndarray:
    """A JPEG stored sideways with an EXIF Orientation tag, as phone and dermatoscope cameras write."""
    rng = np.random.default_rng(1)
    pixels = np.kron(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return pixels


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path, orientation):
    from transformers.image_utils import load_image

    path = tmp_path / "photo.jpg"
    stored = _photo_with_orientation(path, orientation)
    ours = np.asarray(open_image(path))
    assert np.array_equal(ours, np.asarray(load_image(str(path))))
    assert ours.shape[:2] == (stored.shape[:2] if orientation in (1, 3) else stored.shape[1::-1])


def test_a_dicom_named_without_suffix_is_read_as_dicom(tmp_path):
    """PACS exports are often named by UID; the DICM marker (PS3.10 7.1) says what they are."""
    src = catalog.source_path("CT_small.dcm")
    bare = tmp_path / "1.3.6.1.4.1.5962.1.1.1.1.1"
    shutil.copy(src, bare)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert is_dicom(bare) and not is_dicom(tmp_path / "x.png")
    assert np.array_equal(np.asarray(open_image(bare)), np.asarray(dicom_to_image(src)))


def test_a_dicom_without_its_preamble_is_read(tmp_path):
    """Older PACS exports (IM0001) store the dataset alone: no 128-byte preamble, no DICM marker, no
    file meta. pydicom reads them when forced; they were refused. The same pixels as the Part 10
    file, as pydicom writes the dataset bare (implicit VR little endian, the default then)."""
    import pydicom

    src = catalog.source_path("CT_small.dcm")
    ds = pydicom.dcmread(src)
    del ds.file_meta  # what such a file lacks: with it, pydicom writes it in its transfer syntax
    ds.preamble = None
    bare = tmp_path / "IM0001"
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = bare.read_bytes()
    assert data[:2] == b"\x08\x00" and b"DICM" not in data[:132]
    assert np.array_equal(np.asarray(open_image(bare)), np.asarray(dicom_to_image(src)))
    (tmp_path / "notes.dcm").write_bytes(b"\x08\x00 a text file that happens to start so")
    with pytest.raises(QoqoptError, match=r"notes\.dcm: not a DICOM file \(no DICM marker"):
        open_image(tmp_path / "notes.dcm")


def test_an_ecg_waveform_dicom_is_the_sheet_a_clinical_ecg_item_shows(tmp_path):
    """A waveform DICOM has no pixels: it is drawn as the 12-lead sheet, as a user set's ECG item is."""
    from qoqopt.data import load_jsonl

    src = catalog.source_path("waveform_ecg.dcm")
    (tmp_path / "set.jsonl").write_text(f'{{"dicom": "{src}", "question": "Rhythm?", "answer": "x", "domain": "ecg"}}\n')
    item = load_jsonl(tmp_path / "set.jsonl")[0].image
    ours = open_image(src)
    assert ours.width > ours.height and np.array_equal(np.asarray(ours.resize(item.size, Image.Resampling.LANCZOS)), np.asarray(item))


def _white_is_zero(path):
    """Set the TIFF's PhotometricInterpretation tag (262) to 0, WhiteIsZero, in place."""
    data = bytearray(path.read_bytes())
    entry = data.find(bytes([0x06, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00]))  # tag 262, SHORT, count 1
    assert entry > 0 and data[entry + 8] == 1, "a BlackIsZero TIFF, as Pillow writes greyscale"
    data[entry + 8 : entry + 10] = (0).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_a_16_bit_white_is_zero_tiff_is_shown_as_its_8_bit_twin(tmp_path):
    """A WhiteIsZero TIFF (photometric 0) shows stored 0 as white. Pillow inverts the 8-bit one
    itself, not the 16-bit one, which was shown inverted: both now show one picture."""
    ramp = np.arange(64 * 64).reshape(64, 64) % 256
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "w8.tif")
    Image.fromarray((ramp * 257).astype(np.uint16)).save(tmp_path / "w16.tif")  # the same grey levels, high byte
    for name in ("w8.tif", "w16.tif"):
        _white_is_zero(tmp_path / name)
    assert Image.open(tmp_path / "w16.tif").mode.startswith("I;16")
    eight, sixteen = (np.asarray(open_image(tmp_path / n)) for n in ("w8.tif", "w16.tif"))
    assert eight[0, 0, 0] == 255  # stored 0 is white (Pillow's own reading)
    np.testing.assert_array_equal(sixteen, eight)


def test_a_16_bit_image_using_12_bits_is_shown_as_llama_cpp_shows_it_with_a_warning(tmp_path, capsys):
    path = tmp_path / "detector.png"
    Image.fromarray(np.linspace(0, 4095, 64 * 64).astype(np.uint16).reshape(64, 64)).save(path)
    pixels = np.asarray(open_image(path))
    # stb_image's stbi__convert_16_to_8 keeps each sample's high byte (test_gguf compares with llama.cpp's loader)
    high_byte = (np.asarray(Image.open(path)).astype(np.uint16) >> 8).astype(np.uint8)
    assert np.array_equal(pixels, np.repeat(high_byte[..., None], 3, axis=-1)) and pixels.max() == 4095 >> 8
    assert "uses at most 12 bits" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB"])
def test_transparency_is_laid_over_white_as_transformers_processor_does(tmp_path, mode):
    """A scan annotated on a transparent PNG came out black (the alpha dropped): transformers' image
    processor (convert_to_rgb) and QoQ-Med's training loader lay it over white, and so does qoqopt
    before either runtime sees it. Alpha bands, a palette's transparent index and an RGB PNG's tRNS
    colour alike."""
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    alpha = np.where(rng.random((40, 60)) < 0.5, 0, rng.integers(1, 256, (40, 60))).astype(np.uint8)
    path = tmp_path / "scan.png"
    if mode in ("RGBA", "LA"):
        Image.fromarray(np.dstack([rgb, alpha])).convert(mode).save(path)
    elif mode == "P":
        Image.fromarray(rgb).quantize(16).save(path, transparency=3)
    else:  # an odd colour, which the even-valued rest never matches, is the see-through one
        keyed = rgb // 2 * 2
        keyed[:8, :8] = (11, 13, 17)
        Image.fromarray(keyed).save(path, transparency=(11, 13, 17))
    theirs = convert_to_rgb(Image.open(path), return_numpy=True)
    assert np.array_equal(np.asarray(open_image(path)), theirs)
    assert (theirs == 255).all(axis=-1).sum() > 10  # something was see-through, and shows white


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"hello, not an image"), "not an image Pillow can read, nor a DICOM file"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "not an image Pillow can read, nor a DICOM file"),
        (lambda p: Image.fromarray(np.ones((8, 8), np.float32)).save(p.with_suffix(".tif")) or
         p.with_suffix(".tif").rename(p), "a floating-point image has no display range"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: Image.new("LAB", (8, 8), (50, 0, 0)).save(p.with_suffix(".tif")) or p.with_suffix(".tif").rename(p),
         "a CIELAB image, which Pillow cannot convert to RGB"),
    ],
)
def test_unreadable_images_are_one_line(tmp_path, make, message):
    path = tmp_path / "scan.png"
    make(path)
    with pytest.raises(QoqoptError, match=message) as info:
        open_image(path)
    assert "\n" not in str(info.value)


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_ask_refuses_a_bad_image_before_loading_the_model(tiny_dir, tmp_path, capsys):

    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    err = refused(["ask", tiny_dir, "--image", tmp_path / "scan.png", "--question", "Which region?"], capsys)
    assert "scan.png: not an image Pillow can read" in err


def test_ask_takes_one_image_and_a_plain_question(tiny_dir, tmp_path, capsys):
    """A second --image replaced the first unsaid; a question holding a control token of the chat
    format was read as control (llama.cpp: <|im_end|> ended the turn; transformers: <|image_pad|> was
    a ValueError after the model loaded; llama.cpp's media marker asked for a second image). The
    tokens: those the published Qwen2.5-VL-7B-Instruct tokenizer_config.json marks "special": true
    (ids 151643-151656), and llama.cpp's mtmd media marker."""

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip

    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "a.png")
    img = tmp_path / "a.png"

    for flag, twice in (("--image", ["--image", str(img), "--image", str(img), "--question", "q"]),
                        ("--question", ["--image", str(img), "--question", "q", "--question", "r"]),
                        ("--item", ["--item", "a", "--item", "b"])):  # fmt: skip
        assert refused(["ask", tiny_dir, *twice], capsys) == f"error: {flag} was given twice; it takes one value (see `qoqopt ask --help`)"
    for token in (*special, "<__media__>"):
        err = refused(["ask", tiny_dir, "--image", img, "--question", f"Which region? {token} x"], capsys)
        assert err == f"error: --question: the question holds {token}, which the chat format reads as a control token, not text; remove it"
    for blank in ("", "   "):
        assert refused(["ask", tiny_dir, "--image", img, "--question", blank], capsys) == "error: --question: the question is empty"


def test_ask_refuses_a_prompt_past_the_models_context(tiny_dir, tmp_path):
    """transformers generated past max_position_embeddings without a word (34,001 tokens > 32,768). A
    prompt that fits but leaves no room for the reply is refused too."""
    from transformers import AutoConfig

    from tests.conftest import error_line, run_cli

    limit = AutoConfig.from_pretrained(tiny_dir).get_text_config().max_position_embeddings
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "a.png")
    question = "a " * (limit - 300)  # one token each: with the image and template, under the limit
    err = error_line(run_cli("ask", str(tiny_dir), "--image", str(tmp_path / "a.png"), "--question", question,
                             "--max-tokens", "400"))  # fmt: skip
    assert err.endswith(f"and the reply up to 400, but the model's context holds {limit}: shorten the question or "
                        "the reply"), err  # fmt: skip


def test_a_frame_is_picked_from_a_dicom_stack_and_a_gif(tmp_path):
    """--frame / "frame": the slice asked for (a DICOM's middle one by default), out of range in one line."""
    from qoqopt.data import load_jsonl

    stack = catalog.source_path("emri_small.dcm")  # 10 frames
    assert np.array_equal(np.asarray(open_image(stack, 3)), np.asarray(dicom_to_image(stack, frame=3)))
    assert np.array_equal(np.asarray(open_image(stack)), np.asarray(dicom_to_image(stack, frame=5)))
    assert not np.array_equal(np.asarray(open_image(stack, 3)), np.asarray(open_image(stack)))
    with pytest.raises(QoqoptError, match=r"emri_small\.dcm: frame 10 out of range \(it has 10\)"):
        open_image(stack, 10)
    shades = [Image.new("RGB", (64, 48), (v, v, v)) for v in (0, 120, 240)]
    shades[0].save(tmp_path / "clip.gif", save_all=True, append_images=shades[1:])
    assert [np.asarray(open_image(tmp_path / "clip.gif", k))[0, 0, 0] for k in (0, 2)] == [0, 240]
    (tmp_path / "set.jsonl").write_text(
        f'{{"dicom": "{stack}", "frame": 3, "question": "Plane?", "answer": "Axial", "domain": "mri"}}\n')
    item = load_jsonl(tmp_path / "set.jsonl")[0].image
    assert np.array_equal(np.asarray(item), np.asarray(resize_to(open_image(stack, 3), item.size)))
    (tmp_path / "set.jsonl").write_text(
        f'{{"dicom": "{stack}", "frame": 12, "question": "Plane?", "answer": "Axial", "domain": "mri"}}\n')
    with pytest.raises(QoqoptError, match=r"set\.jsonl:1: .*frame 12 out of range \(it has 10\)"):
        load_jsonl(tmp_path / "set.jsonl")  # at load, from the header


def test_too_many_pixels_is_refused_in_a_dicom_as_in_a_png(tmp_path, monkeypatch, capsys):
    """Pillow refuses a PNG of more than twice its MAX_IMAGE_PIXELS as a decompression bomb and warns
    above it (its two-line warning is now one); a DICOM had no limit (20000 x 20000 took 10 GB). Its
    header is enough to refuse it, in `check_image` (sets) and before the decode in `open_image`."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    from qoqopt.images import check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's limits, scaled down
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "big.png")  # 1200: warned
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "bomb.png")  # 2500: refused
    import warnings

    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert open_image(tmp_path / "big.png").size == (40, 30)
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]  # said once, below
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path / 'big.png'}: 40x30 is 1,200 pixels, over Pillow's 1,000-pixel "
                   "decompression-bomb limit; decoding it takes much memory\n")  # fmt: skip
    with pytest.raises(QoqoptError, match="too many pixels for a safe decode"):
        open_image(tmp_path / "bomb.png")
    ds = Dataset()
    ds.set_pixel_data(np.zeros((50, 50), np.uint8), "MONOCHROME2", 8)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    for check in (open_image, check_image):
        with pytest.raises(QoqoptError, match=r"bomb\.dcm: 50x50 pixels, more than 2,000 a frame, which Pillow "):
            check(tmp_path / "bomb.dcm")
    assert pydicom.dcmread(tmp_path / "bomb.dcm").pixel_array.shape == (50, 50)  # a readable file, just too big


def test_smaller_refusals_say_what_is_wrong(tmp_path, capsys):
    """Each said something else before: a truncated PNG only "OSError"; a signed 16-bit TIFF that its
    values "do not fit 16 bits" (they do, signed); a folder given as a JSONL set "no such file"; a
    folder of GGUF files without a manifest "is it a transformers checkpoint?"."""
    from qoqopt.data import load_jsonl

    cut = tmp_path / "cut.png"
    cut.write_bytes(_png_bytes()[:-200])  # Pillow knows the format; the data ends early
    with pytest.raises(QoqoptError, match=r"cut\.png: not an image Pillow can read, nor a DICOM file \(image file is truncated"):
        open_image(cut)
    Image.fromarray(np.array([[-1000, 1000]], np.int16).astype(np.int32), "I").save(tmp_path / "hu.tif")
    with pytest.raises(QoqoptError, match=r"hu\.tif: signed values \(-1000\.\.1000\) have no display range"):
        open_image(tmp_path / "hu.tif")
    with pytest.raises(QoqoptError, match=rf"^{tmp_path} is a directory; give the JSONL file of the set$"):
        load_jsonl(tmp_path)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.Q8_0.gguf").write_bytes(b"GGUF")
    err = refused(["info", tmp_path / "gguf"], capsys)
    assert err.endswith("holds GGUF files but no manifest.json (not a `qoqopt export` build); `qoqopt info` reads one .gguf file of it")
