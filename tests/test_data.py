"""qoqopt.data: real clinical files -> images, ECG signals, QoQ-Med prompts, splits, JSONL sets."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections import Counter

import jinja2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from qoqopt.data import (
    BUILTIN_DOMAINS,
    DOMAINS,
    MAX_PIXELS,
    MIN_PIXELS,
    THINK_SUFFIX,
    balanced_sample,
    clinical_set,
    dicom_to_array,
    dicom_to_image,
    ecg_signal,
    find_item,
    load_jsonl,
    read_ecg,
    render_ecg,
    report_texts,
)
from qoqopt.data import catalog
from qoqopt.data.dicom import WINDOW_PRESETS
from qoqopt.data.ecg import PAPER_MM, heart_rate, r_peaks
from qoqopt.data.prompts import format_question
from qoqopt.errors import QoqoptError
from tests.conftest import refused


@pytest.fixture(scope="module")
def eval_items():
    return clinical_set("eval", n_per_base=1)


def _pixels(item) -> np.ndarray:
    return np.asarray(item.image)


# ---- coverage and prompt format -------------------------------------------------------------------
def test_five_domains_with_several_question_types(eval_items):
    assert {"ct", "mri", "ultrasound", "xray", "ecg"} <= set(BUILTIN_DOMAINS)
    assert {it.domain for it in eval_items} == set(BUILTIN_DOMAINS)
    for domain in BUILTIN_DOMAINS:
        qtypes = {it.meta["qtype"] for it in eval_items if it.domain == domain}
        assert len(qtypes) >= 2, domain  # the answer is not simply the domain
        assert DOMAINS[domain].display
    for it in eval_items:
        assert 3 <= len(it.choices) <= 6
        assert it.answer in it.choices


def test_question_and_reference_reply_follow_qoq_med(eval_items, fixture_7b):
    ct = next(it for it in eval_items if it.meta["qtype"] == "region_ct")
    assert ct.question.startswith("Above is a CT image of a patient. Which body region is shown?")
    assert "Answer with one word from the following: Head, Chest, Abdomen, Pelvis, Spine." in ct.question
    modality = next(it for it in eval_items if it.meta["qtype"] == "modality" and it.domain == "ecg")
    assert "ECG" not in modality.question.split(" Answer")[0]  # the preamble must not give it away
    # QoQ-Med's own format template, rendered around each question, less the bounding-box sentence
    # that prompts.py documents dropping (no box annotations to teach)
    template = jinja2.Template((fixture_7b / "medical_format.jinja").read_text())
    for it in eval_items:
        rendered = template.render(content=it.question.split(" You FIRST")[0])
        expected, dropped = re.subn(r"\nBefore analyzing medical images.*?wrapped in ```json \.\.\. ``` tags\. ", " ", rendered)
        assert dropped == 1 and it.question == expected
        assert re.fullmatch(r"<think>[^<]{10,200}</think>\n\\boxed\{" + re.escape(it.answer) + r"\}", it.target_text())
    msg = ct.messages()
    assert msg[0]["role"] == "user"
    assert [c["type"] for c in msg[0]["content"]] == ["image", "text"]
    assert isinstance(msg[0]["content"][0]["image"], Image.Image)
    assert msg[0]["content"][1]["text"] == ct.question


def test_every_base_image_renders_inside_qoq_med_pixel_range():
    items = {it.meta["view"]: it for it in clinical_set("calib", n_per_base=1)}
    for key, it in items.items():
        img = it.image
        assert img.mode == "RGB"
        assert MIN_PIXELS <= img.width * img.height <= MAX_PIXELS, key
        assert img.width % 28 == 0 and img.height % 28 == 0, key
        assert np.asarray(img).std() > 10, f"{key} looks blank"


def test_sizes_are_what_the_qwen_processor_keeps():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    from qoqopt.data import fit_size

    for wh in [(1080, 700), (640, 480), (256, 120), (1841, 1955), (64, 64), (5000, 200)]:
        w, h = fit_size(*wh)
        assert pil.smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (h, w)


def test_a_thin_picture_the_processor_takes_stays_one_it_takes_once_resized(tmp_path):
    """A picture with sides up to 200 times apart passes the aspect check, but its size on the
    28-pixel grid could be over 200 apart, which the processor refuses (a 7443x39 scan became
    7448x28, a 9530x57 one 9352x28: a traceback mid-export). Every such size a user set's picture
    is given, at its own size and at --max-side 320 and 8192, is one transformers' smart_resize
    takes and keeps; and a set of such pictures loads at those sizes."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    from qoqopt.data import fit_size
    from qoqopt.data.jsonl import _within_aspect

    rng = np.random.default_rng(0)
    sizes = [(long, short) for short in range(1, 121) for long in {200 * short, *rng.integers(short, 200 * short + 1, 12)}]
    for long, short in sizes + [(7443, 39), (5615, 29), (9530, 57), (20000, 119)]:
        for width, height in ((int(long), short), (short, int(long))):
            for max_side in (max(width, height), 320, 8192):
                w, h = _within_aspect(fit_size(width, height, max_side), (width, height))
                kept = pil.smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
                assert kept == (h, w), (width, height, max_side)
                assert w == h or (w > h) == (width > height), (width, height)
    rows = []
    for i, size in enumerate(((7443, 39), (57, 9530))):
        Image.new("RGB", size, (90, 90, 90)).save(tmp_path / f"thin{i}.png")
        rows.append({"image": f"thin{i}.png", "question": "Which organ?", "answer": "Liver", "domain": "ultrasound", "id": f"t{i}"})
    (tmp_path / "thin.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # the aspect is kept where the grid allows it: not squeezed to 200 (9530x57 is 167 long)
    assert [it.image.size for it in load_jsonl(str(tmp_path / "thin.jsonl"))] == [(5348, 28), (56, 9352)]


def test_report_texts():
    texts = report_texts()
    assert 30 <= len(texts) <= 60
    assert len(set(texts)) == len(texts)
    assert all(t[0].isupper() and t.endswith(".") and len(t) < 160 for t in texts)


# ---- ECG --------------------------------------------------------------------------------------
def test_ecg_plot_is_a_twelve_lead_sheet():
    img = render_ecg(px_per_mm=4)
    assert img.mode == "RGB"
    assert img.size == (round(PAPER_MM[0] * 4), round(PAPER_MM[1] * 4)) == (1080, 700)
    x = np.asarray(img).astype(int)
    ink = (x.max(axis=-1) < 100).mean()  # black traces and labels
    pink = ((x[..., 0] - x[..., 1]) > 20).mean()  # the red millimetre grid
    assert 0.005 < ink < 0.15
    assert pink > 0.2
    # The grid repeats every 5 mm = 20 px: columns on a major line are redder than between lines.
    redness = (x[..., 0] - x[..., 1]).mean(axis=0)
    assert redness[::20][1:-1].mean() > 2 * np.median(redness)


# The standard 12-lead print: three rows of four 2.5 s panels, then a 10 s lead II rhythm strip.
PRINT_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))


def _sheet_columns(mv: np.ndarray, fs: float, x0: int, xs: range, px_per_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The signal's (min + max) / 2 and max over each pixel column's time span, baseline removed: a
    column's stroke runs from the lowest to the highest value drawn in it."""
    mv = mv - np.median(mv)
    spans = [mv[int((x - x0) / px_per_s * fs): int((x + 1 - x0) / px_per_s * fs) + 1] for x in xs]
    return np.array([(s.min() + s.max()) / 2 for s in spans]), np.array([s.max() for s in spans])


def test_ecg_sheet_draws_each_dicom_lead_at_print_scale():
    """The sheet against the waveform pydicom reads from the file. Each panel of the standard print
    traces the lead it belongs to (the trace is nearest that lead among all 12), at 25 mm/s and at
    10 mm/mV as the sheet's own 1 mV calibration pulse shows it, and the rhythm strip's R waves reach
    the DICOM's heights at the DICOM's times. Rows and the trace start are found on the sheet."""
    px = 4  # pixels per mm of paper: 25 mm/s is 100 px/s
    path = catalog.source_path("waveform_ecg.dcm")
    ds = pydicom.dcmread(path)
    group = ds.WaveformSequence[0]
    fs, raw = float(group.SamplingFrequency), ds.waveform_array(0)
    assert {c.ChannelSensitivityUnitsSequence[0].CodeValue for c in group.ChannelDefinitionSequence} == {"uV"}
    leads = {re.sub(r"\(.*?\)|Lead", "", c.ChannelSourceSequence[0].CodeMeaning).strip(): raw[:, i] / 1000
             for i, c in enumerate(group.ChannelDefinitionSequence)}  # fmt: skip
    assert len(leads) == 12
    ink = np.asarray(render_ecg(path, px_per_mm=px)).max(axis=-1) < 110
    # each row's calibration pulse: flat at the baseline from 4 mm, 1 mV high from 6 mm
    bases = np.flatnonzero(ink[:, int(4.3 * px): int(5.7 * px)].any(axis=1))
    tops = np.flatnonzero(ink[:, int(7.5 * px): int(9.5 * px)].any(axis=1))
    assert len(bases) == len(tops) == 4
    px_per_mv = bases - tops
    assert set(px_per_mv) == {10 * px}  # 10 mm/mV
    px_per_mv = 10 * px
    row0 = ink[bases[0] - 11 * px: bases[0] + 19 * px]
    x0 = int(np.flatnonzero(row0[:, int(13.5 * px):].any(axis=0))[0]) + int(13.5 * px)  # the first trace
    px_per_s = 25 * px
    for r, names in enumerate(PRINT_LAYOUT):
        for c, name in enumerate(names):
            # inside the panel, clear of the lead-change markers; above the band sits the label
            xs = range(x0 + int((62.5 * c + 1.5) * px), x0 + int((62.5 * (c + 1) - 1.5) * px))
            band = ink[bases[r] - 11 * px: bases[r] + 19 * px, xs.start: xs.stop]
            drawn = band.sum(axis=0) > 0
            y = (band * np.arange(band.shape[0])[:, None]).sum(axis=0) / np.maximum(band.sum(axis=0), 1)
            height_mm = (11 * px - y[drawn]) / px_per_mv * 10
            p90 = {lead: np.percentile(np.abs(height_mm - 10 * _sheet_columns(mv, fs, x0, xs, px_per_s)[0][drawn]), 90)
                   for lead, mv in leads.items()}  # fmt: skip
            assert drawn.mean() > 0.98 and p90[name] < 0.35, (name, p90[name])  # mm: about one pixel
            assert min(p90, key=p90.get) == name, (name, sorted(p90.items(), key=lambda kv: kv[1])[:3])
    # rhythm strip: the top of the ink over each R wave (lead II > 0.8 mV) is that wave's height
    xs = range(x0 + 10 * px, x0 + 250 * px - 2)
    band = ink[bases[3] - 20 * px: bases[3] + 10 * px, xs.start: xs.stop]
    _, peak_mv = _sheet_columns(leads["II"], fs, x0, xs, px_per_s)
    r_wave = (peak_mv > 0.8) & band.any(axis=0)
    drawn_mv = (20 * px - np.argmax(band, axis=0)[r_wave]) / px_per_mv
    assert r_wave.sum() >= 9  # columns on the ~10 R waves of a 60 bpm recording
    assert np.median(np.abs(drawn_mv - peak_mv[r_wave])) < 0.04 and np.abs(drawn_mv - peak_mv[r_wave]).max() < 0.25


def test_ecg_signal_matches_the_dicom_timing_and_units():
    path = catalog.source_path("waveform_ecg.dcm")
    ds = pydicom.dcmread(path)
    group = ds.WaveformSequence[0]
    fs, n = float(group.SamplingFrequency), int(group.NumberOfWaveformSamples)
    rec = read_ecg(path)
    assert rec.fs == fs == 1000.0 and rec.duration_s == n / fs == 10.0
    # Lead II is channel 1 of the file, in microvolts there and millivolts here.
    assert group.ChannelDefinitionSequence[1].ChannelSourceSequence[0].CodeMeaning == "Lead II"
    assert group.ChannelDefinitionSequence[1].ChannelSensitivityUnitsSequence[0].CodeValue == "uV"
    np.testing.assert_allclose(rec.lead("II"), ds.waveform_array(0)[:, 1] / 1000)

    sig = ecg_signal(rec)
    assert sig.shape == (8, 2500) and sig.dtype == np.float32
    out_fs = sig.shape[1] / 10.0  # 10 s in 2500 samples: 250 per second
    np.testing.assert_allclose(sig[1], rec.lead("II")[:: int(fs / out_fs)], atol=0.08)  # same instants
    assert np.corrcoef(sig[2], rec.lead("V1")[::4])[0, 1] > 0.98  # rows are I, II, V1..V6
    # R waves fall at the same times (within one output sample) at both rates.
    t_src = r_peaks(rec.lead("II"), fs) / fs
    t_out = r_peaks(sig[1].astype(float), out_fs) / out_fs
    assert len(t_src) == len(t_out) >= 9
    assert np.abs(t_src - t_out).max() <= 1 / out_fs
    # Lead II of a normal adult: R wave ~0.5-2 mV, nothing beyond a few mV.
    assert 0.5 < sig[1].max() < 2.5 and -1.0 < sig[1].min() < 0
    # The label "Normal" rate rests on this: the device's RR interval and our R waves agree.
    assert abs(heart_rate(rec) - 60000 / rec.measurements["RR Interval"]) < 2
    assert any("SINUS" in s for s in rec.statements)


def test_ecg_items_carry_the_signal(eval_items):
    ecg = [it for it in eval_items if it.domain == "ecg"]
    assert {it.meta["qtype"] for it in ecg} == {"modality", "rhythm", "rate"}
    assert all(it.ecg_signal.shape == (8, 2500) for it in ecg)
    assert all(it.ecg_signal is None for it in eval_items if it.domain != "ecg")


# ---- DICOM conversion (hand-computable references) ---------------------------------------------
def _dataset(pixels: np.ndarray, pi: str, bits: int, **tags) -> Dataset:
    ds = Dataset()
    ds.set_pixel_data(pixels, pi, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 1], written out independently of the code."""
    c, w = center - 0.5, width - 1
    return np.clip((x - c) / w + 0.5, 0, 1)


def test_monochrome1_rescale_and_window():
    stored = np.array([[0, 100], [200, 300]], np.uint16)
    ds = _dataset(stored, "MONOCHROME1", 16, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=400)
    hu = stored.astype(float) * 2 - 100  # modality LUT: -100, 100, 300, 500
    expected = np.rint((1 - _linear_window(hu, 200, 400)) * 255)  # MONOCHROME1: low values white
    out = dicom_to_array(ds)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], [[255, 191], [63, 0]])
    assert (out[..., 0] == out[..., 2]).all()


def test_enhanced_ct_takes_rescale_window_and_orientation_from_its_functional_groups():
    """An enhanced multi-frame CT (PS3.3 C.7.6.16) keeps rescale, window and plane orientation in
    its Shared Functional Groups; read only at the top level, stored values passed for HU (air came
    out grey) and the mirrored plane stayed mirrored. Expected: the standard's LINEAR window of
    stored x slope + intercept, written out here, with the columns flipped (rows run toward -x)."""
    path = catalog.source_path("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [-1, 0, 0, 0, 1, 0]
    hu = ds.pixel_array[1].astype(float) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    expected = np.rint(_linear_window(hu, float(voi.WindowCenter), float(voi.WindowWidth)) * 255)[:, ::-1]
    out = dicom_to_array(path)  # the middle of its 2 frames
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 0, 0] == 0  # air is black


def test_enhanced_ct_with_an_ow_voi_lut(tmp_path):
    """An enhanced multi-frame file's frame view lost the file's encoding, and pydicom reads OW LUT
    data by it: a VOI LUT Sequence there was an AttributeError traceback. Expected, by PS3.3's LUT
    rule written out: HU from the shared groups' rescale, each clipped into the LUT's 4 entries (it
    takes precedence over the frame's window), the mirrored plane's columns flipped."""
    path = catalog.source_path("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.add_new("LUTData", "OW", np.array([0, 60, 120, 255], "<u2").tobytes())
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm")
    read = pydicom.dcmread(tmp_path / "lut.dcm")
    rescale = read.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = read.pixel_array[1].astype(float) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    expected = np.array([0, 60, 120, 255])[np.clip(np.rint(hu).astype(int), 0, 3)][:, ::-1]
    np.testing.assert_array_equal(dicom_to_array(read)[..., 0], expected)


def test_a_frames_own_group_wins_and_the_dataset_is_left_as_it_was():
    """Per-frame functional groups override shared ones for their frame; reading never writes them
    into the caller's dataset; a per-frame sequence that does not cover every frame is refused."""
    import copy

    ds = pydicom.dcmread(catalog.source_path("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    own = copy.deepcopy(shared.FrameVOILUTSequence)
    own[0].WindowCenter, own[0].WindowWidth = 40, 400
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = own  # frame 1's own window
    before = ds.to_json_dict(bulk_data_threshold=1 << 40, bulk_data_element_handler=lambda e: "")
    rescale = shared.PixelValueTransformationSequence[0]
    hu = ds.pixel_array[1].astype(float) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    np.testing.assert_array_equal(dicom_to_array(ds, frame=1)[..., 0], np.rint(_linear_window(hu, 40, 400) * 255)[:, ::-1])
    assert ds.to_json_dict(bulk_data_threshold=1 << 40, bulk_data_element_handler=lambda e: "") == before
    del ds.PerFrameFunctionalGroupsSequence[1]
    with pytest.raises(QoqoptError, match="1 per-frame functional groups for 2 frames"):
        dicom_to_array(ds)


def test_jpeg_ls_lossless_gives_the_uncompressed_twins_pixels():
    """PACS store most images compressed losslessly (JPEG Lossless, JPEG-LS), which pydicom reads only
    with a plugin (python-gdcm, a dependency): pydicom's own test pair must give identical pictures."""
    from pydicom.data import get_testdata_file

    compressed, plain = (get_testdata_file(n) for n in ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"))
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.name == "JPEG-LS Lossless Image Compression"
    np.testing.assert_array_equal(dicom_to_array(compressed), dicom_to_array(plain))


def test_window_override_on_hounsfield_units():
    stored = np.array([[0, 1024], [1064, 3000]], np.uint16)  # -1024 (air), 0 (water), 40, 1976 HU
    ds = _dataset(stored, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=80)
    brain = dicom_to_array(ds)[..., 0]
    np.testing.assert_array_equal(brain, np.rint(_linear_window(stored - 1024.0, 40, 80) * 255))
    bone = dicom_to_array(ds, window=(300, 2000))[..., 0]
    np.testing.assert_array_equal(bone, np.rint(_linear_window(stored - 1024.0, 300, 2000) * 255))
    assert bone[0, 0] == 0 and bone[1, 1] == 255 and 0 < bone[0, 1] < bone[1, 0] < 255


def test_multiframe_takes_the_requested_or_middle_frame():
    frames = np.stack([np.full((2, 3), v, np.uint8) for v in (10, 20, 30)])
    ds = _dataset(frames, "MONOCHROME2", 8)
    assert (dicom_to_array(ds) == 20).all()  # default: the middle frame
    assert (dicom_to_array(ds, frame=0) == 10).all()
    with pytest.raises(QoqoptError, match="frame 3 out of range"):
        dicom_to_array(ds, frame=3)


def test_colour_rgb_and_ybr():
    rgb = np.array([[[255, 0, 0], [0, 128, 255]]], np.uint8)
    np.testing.assert_array_equal(dicom_to_array(_dataset(rgb, "RGB", 8)), rgb)
    # YBR_FULL of pure red is (76, 85, 255) and of mid grey (128, 128, 128) (ITU-R BT.601, full range).
    ybr = np.array([[[76, 85, 255], [128, 128, 128]]], np.uint8)
    out = dicom_to_array(_dataset(ybr, "YBR_FULL", 8)).astype(int)
    np.testing.assert_allclose(out, [[[255, 0, 0], [128, 128, 128]]], atol=2)


def test_slices_stored_mirrored_are_flipped_for_display():
    px = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40  # 8-bit, no window: shown as stored
    standard = _dataset(px, "MONOCHROME2", 8, ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(dicom_to_array(standard)[..., 0], px)
    upside_down = _dataset(px, "MONOCHROME2", 8, ImageOrientationPatient=[1, 0, 0, 0, -1, 0])  # columns to anterior
    np.testing.assert_array_equal(dicom_to_array(upside_down)[..., 0], px[::-1])
    np.testing.assert_array_equal(dicom_to_array(upside_down, reorient=False)[..., 0], px)


def test_empty_window_or_rescale_reads_as_none():
    """An empty Window Center/Width is as good as absent, as viewers take it: it gave a flat grey
    picture (every pixel 128). A Rescale Slope left empty beside an intercept is the identity slope:
    pydicom applies neither without both, so the CT's stored values were windowed as if HU (or it was
    a TypeError). Expected: DICOM's HU = stored x slope + intercept, under the CT soft-tissue window
    (40/400) that a CT without a window of its own gets, by PS3.3's LINEAR formula written out above."""
    stored = np.array([[0, 1024], [1064, 3000]], np.uint16)
    for tags, hu in (({"WindowCenter": "", "WindowWidth": ""}, stored * 1.0),
                     ({"WindowCenter": 40, "WindowWidth": ""}, stored * 1.0),
                     ({"RescaleSlope": "", "RescaleIntercept": -1024}, stored * 1.0 - 1024),
                     ({"RescaleSlope": 2, "RescaleIntercept": ""}, stored * 2.0)):  # fmt: skip
        out = dicom_to_array(_dataset(stored, "MONOCHROME2", 12, Modality="CT", **tags))
        np.testing.assert_array_equal(out[..., 0], np.rint(_linear_window(hu, 40, 400) * 255), err_msg=str(tags))


def test_a_negative_rescale_slope_is_shown_the_right_way_up():
    """A negative Rescale Slope is legal: pydicom's window output then runs from high to low, and the
    picture was all black. The display is the window (PS3.3 C.11.2.1.2.1, written out in
    _linear_window) of the rescaled values, with or without a window in the file (a CT without one
    gets the soft-tissue preset)."""
    stored = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    ramp = _dataset(stored, "MONOCHROME2", 12, RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=2048, WindowWidth=4096)
    expected = np.rint(_linear_window(4095.0 - stored, 2048, 4096) * 255)
    np.testing.assert_array_equal(dicom_to_array(ramp)[..., 0], expected)
    ct = _dataset(stored, "MONOCHROME2", 12, Modality="CT", RescaleSlope=-1, RescaleIntercept=1000)
    center, width = WINDOW_PRESETS["Soft tissue"]
    np.testing.assert_array_equal(dicom_to_array(ct)[..., 0], np.rint(_linear_window(1000.0 - stored, center, width) * 255))


def test_a_voi_lut_pydicom_passes_over_and_an_empty_function_mean_the_window():
    """An empty VOI LUT Sequence, or an item without its descriptor or data, was an IndexError or
    AttributeError mid-export: pydicom applies the window instead, and so does qoqopt. An empty VOI
    LUT Function was pydicom's ValueError: it is LINEAR. One DICOM does not define is one line."""
    stored = np.array([[0, 1000], [2000, 4095]], np.uint16)
    expected = np.rint(_linear_window(stored.astype(float), 2048, 1024) * 255)
    no_data = Dataset()
    no_data.LUTDescriptor = [4, 0, 8]
    for tags in ({"VOILUTSequence": []}, {"VOILUTSequence": [Dataset()]}, {"VOILUTSequence": [no_data]},
                 {"VOILUTFunction": ""}):  # fmt: skip
        ds = _dataset(stored, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=1024, **tags)
        np.testing.assert_array_equal(dicom_to_array(ds)[..., 0], expected, err_msg=str(tags))
    gamma = _dataset(stored, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="GAMMA")
    with pytest.raises(QoqoptError, match="VOI LUT Function is 'GAMMA', none of the LINEAR, LINEAR_EXACT, SIGMOID"):
        dicom_to_array(gamma)


def test_8_bit_data_through_a_modality_lut_is_not_taken_as_grey_levels():
    """8-bit unsigned data without rescale is shown as stored (ultrasound), but a Modality LUT maps
    it elsewhere: its output up to 4080 was clipped at 255, nearly every pixel white. It shows as a
    file holding the LUT's output values does (pydicom's apply_modality_lut gives those)."""
    from pydicom.pixels import apply_modality_lut

    stored = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = (np.arange(256) * 16).tolist()
    lut = _dataset(stored, "MONOCHROME2", 8, Modality="US", ModalityLUTSequence=[item])
    values = apply_modality_lut(stored, lut).astype(np.uint16)
    assert values.max() == 4080
    plain = dicom_to_array(_dataset(values, "MONOCHROME2", 12, Modality="US"))
    np.testing.assert_array_equal(dicom_to_array(lut), plain)


def test_pixel_padding_is_left_out_of_the_stretch():
    """Without a window, the display stretches the 0.5..99.5 percentiles of the values. Pixel Padding
    (PS3.3 C.7.5.1.1.2: outside the scanned field) filling 30% of a signed MR frame at -32768 set the
    low end, and the tissue showed at grey 249..255: its grey levels are now those of the tissue
    alone, as a frame of the tissue pixels only shows them."""
    g = np.random.default_rng(0)
    tissue = g.integers(0, 1200, (7, 10)).astype(np.int16)
    padded = np.vstack([np.full((3, 10), -32768, np.int16), tissue])
    alone = dicom_to_array(_dataset(tissue, "MONOCHROME2", 16, Modality="MR"))[..., 0]
    shown = dicom_to_array(_dataset(padded, "MONOCHROME2", 16, Modality="MR", PixelPaddingValue=-32768))[..., 0]
    np.testing.assert_array_equal(shown[3:], alone)
    assert alone.min() == 0 and alone.max() == 255


@pytest.mark.parametrize("tags, raw", [
    ({"RescaleSlope": [1, 2], "RescaleIntercept": 0, "Modality": "MR"}, None),  # two slopes: a broadcast error
    ({"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}, (b"1.0\\0.0\\0.0\\0.0\\1.0\\0.0", b"1.0\\0.0\\0.0\\0.0\\1.0\\x.0")),
], ids=["two-rescale-slopes", "orientation-not-numbers"])  # fmt: skip
def test_a_dicom_value_pydicom_cannot_use_is_one_line(tmp_path, tags, raw):
    """Values no check before the decode names were pydicom or numpy tracebacks mid-export."""
    from pydicom.uid import MRImageStorage, generate_uid

    from qoqopt.images import open_image

    ds = _dataset(np.array([[0, 100], [200, 300]], np.uint16), "MONOCHROME2", 12, SOPClassUID=MRImageStorage,
                  SOPInstanceUID=generate_uid(), **tags)  # fmt: skip
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    if raw:
        data = (tmp_path / "odd.dcm").read_bytes()
        assert data.count(raw[0]) == 1
        (tmp_path / "odd.dcm").write_bytes(data.replace(*raw))
    with pytest.raises(QoqoptError, match=r"odd\.dcm: a DICOM attribute qoqopt cannot use \((ValueError|TypeError)"):
        open_image(tmp_path / "odd.dcm")


@pytest.mark.parametrize("tags, broken, message", [
    ({"WindowCenter": 40, "WindowWidth": 0}, None, r"Window Width is .*0.*; a window must be at least 1 wide"),
    ({"WindowCenter": "2048", "WindowWidth": 400}, (b"2048", b"2k48"), r"Window Center is '2k48', not a number"),
    ({"RescaleSlope": "1.25", "RescaleIntercept": 0}, (b"1.25", b"abcd"), r"Rescale Slope is 'abcd', not a number"),
])  # fmt: skip
def test_broken_display_values_are_one_line_at_load(tmp_path, tags, broken, message):
    """A window narrower than PS3.3 C.11.2.1.2 allows, or a rescale or window that is not a number,
    was a pydicom ValueError/TypeError traceback, and only once the item was used (mid-export, after
    the model had loaded): a JSONL set now refuses it at load, naming the line."""
    from pydicom.uid import CTImageStorage, generate_uid

    ds = _dataset(np.array([[0, 100], [200, 300]], np.uint16), "MONOCHROME2", 12, Modality="CT",
                  SOPClassUID=CTImageStorage, SOPInstanceUID=generate_uid(), **tags)  # fmt: skip
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    if broken:  # as a broken writer leaves it: pydicom will not set a DS that is not a number
        data = (tmp_path / "bad.dcm").read_bytes()
        assert data.count(broken[0]) == 1
        (tmp_path / "bad.dcm").write_bytes(data.replace(*broken))
    with pytest.raises(QoqoptError, match=message):
        dicom_to_array(pydicom.dcmread(tmp_path / "bad.dcm"))
    path = _write_set(tmp_path, [GOOD, {**_NO_IMAGE, "dicom": "bad.dcm"}])
    with pytest.raises(QoqoptError, match=r"set\.jsonl:2: .*bad\.dcm: " + message):
        load_jsonl(path)


def test_only_the_window_values_pydicom_reads_are_checked(tmp_path):
    """pydicom windows with a multi-valued element's first value, takes a VOI LUT Sequence over the
    window, and a SIGMOID width only above 0: a second value left empty, a narrow window it does not
    use, or under an override, displays as before. An empty window beside a VOI LUT (its data OW, read
    by the file's encoding) still leaves the LUT applied. References: pydicom's own apply_voi_lut."""
    from pydicom.pixels import apply_voi_lut
    from pydicom.uid import CTImageStorage, generate_uid

    stored = np.array([[0, 1024], [1064, 3000]], np.uint16)
    windowed = np.rint(_linear_window(stored - 1024.0, 40, 80) * 255)
    first = _dataset(stored, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[40, 0],
                     WindowWidth=[80, 0])  # fmt: skip
    np.testing.assert_array_equal(dicom_to_array(first)[..., 0], windowed)
    narrow = _dataset(stored, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=0.5)
    np.testing.assert_array_equal(dicom_to_array(narrow, window=(40, 80))[..., 0], windowed)  # an override
    narrow.VOILUTFunction = "SIGMOID"
    with np.errstate(over="ignore"):  # exp saturates far from the centre; the range is black and white
        sigmoid = apply_voi_lut(stored.astype(float) - 1024, narrow)
        lo, hi = apply_voi_lut(np.array([-1e30, 1e30]), narrow)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the saturation is meant: no overflow warning
        shown = dicom_to_array(narrow)[..., 0]
    np.testing.assert_allclose(shown, np.rint((sigmoid - lo) / (hi - lo) * 255), atol=1)

    lut = _dataset(stored, "MONOCHROME2", 12, SOPClassUID=CTImageStorage, SOPInstanceUID=generate_uid(), Modality="CT")
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # stored 0..3; everything above is the last entry
    item.add_new("LUTData", "OW", np.array([0, 60, 120, 255], "<u2").tobytes())  # as pydicom writes LUT data
    lut.VOILUTSequence = [item]
    lut.WindowCenter, lut.WindowWidth = "", 0.5  # an empty centre; a width the LUT's precedence leaves unused
    lut.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "lut.dcm")
    assert read.VOILUTSequence[0]["LUTData"].VR == "OW"
    expected = apply_voi_lut(read.pixel_array, read)  # pydicom: the LUT, not the window
    np.testing.assert_array_equal(dicom_to_array(read)[..., 0], expected)


def test_one_bit_pixels_are_black_and_white():
    """A 1-bit DICOM (a mask) is shown as Pillow shows a 1-bit image, 0 black and 1 white: with the
    8-bit display range it was 0 and 1 of 255, all black."""
    from pydicom.pixels import pack_bits

    mask = np.array([[0, 1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 1, 1, 1, 0, 0]], np.uint8)
    expected = np.asarray(Image.fromarray(mask.astype(bool)).convert("RGB"))  # Pillow's mode "1"
    packed = _dataset(mask, "MONOCHROME2", 1)  # a byte a pixel, one bit of it stored
    packed.BitsAllocated, packed.PixelData = 1, pack_bits(mask)  # as a segmentation stores it: 8 a byte
    for ds in (_dataset(mask, "MONOCHROME2", 1), packed):
        assert ds.BitsStored == 1 and (ds.pixel_array == mask).all()
        np.testing.assert_array_equal(dicom_to_array(ds), expected)


def test_palette_with_8_bit_values_in_16_bit_entries():
    """Some writers fill a 16-bit palette with 8-bit values (PS3.3 C.7.6.3.1.5 notes it): read as
    16-bit, every colour was near black. Such a table is read as the 8-bit one it is; a true
    16-bit table is unchanged. Reference: pydicom's own palette lookup of the table."""
    from pydicom.pixels import apply_color_lut

    index = np.array([[0, 1], [2, 3]], np.uint8)
    lut = {"Red": [0, 255, 128, 10], "Green": [0, 0, 255, 20], "Blue": [255, 0, 64, 30]}

    def palette(scale: int) -> Dataset:
        ds = _dataset(index, "PALETTE COLOR", 8)
        for colour, values in lut.items():
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", (np.array(values, "<u2") * scale).tobytes())
        return ds

    np.testing.assert_array_equal(dicom_to_array(palette(1)), apply_color_lut(index, palette(1)))
    sixteen = palette(257)  # 255 * 257 = 65535: the same colours at 16 bits
    np.testing.assert_array_equal(dicom_to_array(sixteen), apply_color_lut(index, sixteen) // 257)


def test_real_monochrome1_radiograph_is_inverted():
    # MONOCHROME1 shows its minimum as white: display grey must fall as the stored value rises.
    path = catalog.source_path("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array[::40, ::40].astype(float)
    shown = dicom_to_array(path)[::40, ::40, 0].astype(float)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert np.corrcoef(stored.ravel(), shown.ravel())[0, 1] < -0.95


# ---- splits, augmentation, sampling ----------------------------------------------------------
def test_same_seed_same_pixels_other_seed_other_pixels():
    a = clinical_set("train", n_per_base=2, seed=7, domains=["xray", "ecg"])
    b = clinical_set("train", n_per_base=2, seed=7, domains=["xray", "ecg"])
    c = clinical_set("train", n_per_base=2, seed=8, domains=["xray", "ecg"])
    assert [it.id for it in a] == [it.id for it in b]
    for x, y, z in zip(a[:4], b[:4], c[:4]):
        np.testing.assert_array_equal(_pixels(x), _pixels(y))
        assert not np.array_equal(_pixels(x), _pixels(z))
    np.testing.assert_array_equal(_pixels(find_item(a[3].id, seed=7)), _pixels(a[3]))


def test_eval_views_are_not_train_views():
    kw = dict(n_per_base=3, domains=["mri", "ultrasound"])
    train = clinical_set("train", **kw)
    evals = clinical_set("eval", **kw)
    train_params = {json.dumps(it.meta["augment"], sort_keys=True) for it in train}
    assert not any(json.dumps(it.meta["augment"], sort_keys=True) in train_params for it in evals)
    train_hashes = {_pixels(it).tobytes() for it in train[:12]}
    assert not any(_pixels(it).tobytes() in train_hashes for it in evals[:12])


def test_augmentations_stay_in_their_limits():
    for it in clinical_set("train", n_per_base=4):
        aug = it.meta["augment"]
        src = catalog.view_by_key(it.meta["view"]).source
        assert abs(aug["angle"]) <= (4 if it.domain == "ecg" else 10)
        assert 0.85 <= aug["crop"] <= 1 and 0.9 <= aug["brightness"] <= 1.1
        assert src.flip or not aug["flip"]  # mirroring only where it cannot change the answer


def test_balanced_sample_balances_domains():
    items = clinical_set("eval", n_per_base=2)  # ECG has 6 items, CT 48
    assert Counter(it.domain for it in balanced_sample(items, 25, seed=1)) == {d: 5 for d in BUILTIN_DOMAINS}
    counts = Counter(it.domain for it in balanced_sample(items, 27, seed=1))
    assert max(counts.values()) - min(counts.values()) <= 1
    big = balanced_sample(items, 40, seed=1)  # ECG runs out at 6; the rest share what is left
    counts = Counter(it.domain for it in big)
    assert len(big) == 40 and counts["ecg"] == 6 and min(counts[d] for d in counts if d != "ecg") >= 8
    assert len({id(it) for it in big}) == 40
    assert [it.id for it in balanced_sample(items, 25, seed=1)] == [it.id for it in balanced_sample(items, 25, seed=1)]


# ---- user JSONL sets ----------------------------------------------------------------------------
def _write_set(tmp_path, rows: list) -> str:
    Image.new("RGB", (400, 300), (90, 90, 90)).save(tmp_path / "a.png")
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = {"image": "a.png", "question": "Which organ?", "answer": "Liver", "domain": "ultrasound"}
_NO_IMAGE = {k: v for k, v in GOOD.items() if k != "image"}


def test_jsonl_loads_images_dicoms_and_ecgs(tmp_path):
    ct = catalog.source_path("CT_small.dcm")
    ecg = catalog.source_path("waveform_ecg.dcm")
    rows = [
        {**GOOD, "choices": ["Liver", "Kidney", "Spleen"]},
        "",
        {"dicom": ct, "question": "Which region?", "answer": "Spine", "domain": "ct", "id": "mine"},
        {"dicom": ecg, "question": "Rhythm?", "answer": "Sinus rhythm", "domain": "ecg"},
    ]
    items = load_jsonl(_write_set(tmp_path, rows))
    assert [it.id for it in items] == ["set:1", "mine", "set:4"]
    # the options are offered as the built-in set offers its own (a question listing them is left as it is)
    builtin = format_question("ultrasound", "Which organ?", ["Liver", "Kidney", "Spleen"])
    assert items[0].question == "Which organ?" + builtin.split("Which organ?", 1)[1]
    assert items[1].question == f"Which region? {THINK_SUFFIX}"
    assert items[0].image.size == (392, 308)  # its own size, on the 28-pixel grid
    assert items[1].image.mode == "RGB" and items[1].ecg_signal is None
    assert items[2].ecg_signal.shape == (8, 2500)
    assert items[2].image.size[0] > items[2].image.size[1]


@pytest.mark.parametrize("n", [8, 64, 128, 300])
def test_the_clinical_calibration_chats_are_domain_balanced(n):
    """As export --help says: the ECG domain has the fewest calib images, and one view of each per 40
    chats gave export's default 64 chats only 6 ECGs (13 are its share) and 128 only 12."""
    from qoqopt.calibration import calibration_items
    from qoqopt.data import domain_counts

    items, _ = calibration_items("clinical", n)
    counts = domain_counts(items)
    assert len(items) == n and set(counts) == set(BUILTIN_DOMAINS) and max(counts.values()) - min(counts.values()) <= 1, counts
    assert len({it.id for it in items}) == n


def test_choices_a_question_names_only_inside_other_words_are_offered(tmp_path):
    """Whether the question already lists its choices was a substring test: "Normal" is inside
    "abnormal" and "CT" inside "structure", so those options were never offered. Listed as words,
    in any case, they are left as the user wrote them."""
    rows = [{**GOOD, "question": "Is this chest X-ray abnormal?", "answer": "Normal", "choices": ["Normal", "Abnormal"]},
            {**GOOD, "id": "b", "question": "Which structure: MRI or ultrasound?", "answer": "CT",
             "choices": ["CT", "MRI", "Ultrasound"]},
            {**GOOD, "id": "c", "question": "Normal or abnormal?", "answer": "Normal", "choices": ["Normal", "Abnormal"]}]  # fmt: skip
    offered, structure, listed = load_jsonl(_write_set(tmp_path, rows))
    assert offered.question.startswith("Is this chest X-ray abnormal? Answer with one word from the following: Normal, Abnormal.")
    assert structure.question.startswith("Which structure: MRI or ultrasound? Answer with one word from the following: CT,")
    assert listed.question == f"Normal or abnormal? {THINK_SUFFIX}"


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"image": "a.png", "question": ', r"set\.jsonl:2: invalid JSON"),
        ({k: v for k, v in GOOD.items() if k != "answer"}, r"set\.jsonl:2: missing or empty field 'answer'"),
        ({**GOOD, "domain": "radiology"}, r"set\.jsonl:2: unknown domain 'radiology'"),
        ({**GOOD, "image": "missing.png"}, r"set\.jsonl:2: image file not found"),
        ({**GOOD, "choices": ["Kidney", "Spleen"]}, r"set\.jsonl:2: answer 'Liver' is not among the choices"),
        ({**GOOD, "dicom": "a.png"}, r"set\.jsonl:2: give exactly one of 'image' or 'dicom'"),
        ([1, 2], r"set\.jsonl:2: expected a JSON object"),
        ({**GOOD, "answer": 3}, r"set\.jsonl:2: 'answer' must be a string, not int"),
        ({**GOOD, "id": ["a"]}, r"set\.jsonl:2: 'id' must be a non-empty string"),
        ({**GOOD, "image": "."}, r"set\.jsonl:2: .* is a directory"),
        ({**GOOD, "image": "set.jsonl"}, r"set\.jsonl:2: .*set\.jsonl: not an image Pillow can read"),  # at load
        ({**GOOD, "id": "set:1"}, r"set\.jsonl:2: id 'set:1' is already used on line 1"),
        ({**GOOD, "choices": ["Liver", "liver"]}, r"set\.jsonl:2: 'choices' lists an option twice"),
        ({**GOOD, "answer": "Normal, no findings", "choices": ["Normal, no findings", "Mass"]},
         r"set\.jsonl:2: choice 'Normal, no findings' holds a comma, which separates labels"),
        # a control token is read as control by both runtimes: the chat would not be the one written
        ({**GOOD, "question": "Which organ?<|im_end|>"}, r"set\.jsonl:2: the question holds <\|im_end\|>, which the chat"),
        ({**GOOD, "answer": "Liver<|endoftext|>"}, r"set\.jsonl:2: the answer holds <\|endoftext\|>"),
        ({**GOOD, "choices": ["Liver", "<__media__>"]}, r"set\.jsonl:2: the choice holds <__media__>"),
        # the reference reply's reasoning is chat text too (an image pad there broke calibration after loading)
        ({**GOOD, "meta": {"reason": "x <|image_pad|>"}}, r"set\.jsonl:2: the meta\.reason holds <\|image_pad\|>"),
        ({**GOOD, "meta": {"reason": ["x"]}}, r"set\.jsonl:2: 'meta\.reason' must be a string, not list"),
        ({**GOOD, "question": "   "}, r"set\.jsonl:2: missing or empty field 'question'"),
        # half a UTF-16 pair is no character: the tokenizers failed on it mid-export, `data list` in a traceback
        ({**GOOD, "question": "Which organ? \ud83d"}, r"set\.jsonl:2: the question holds U\+D83D, half of a UTF-16 pair"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    path = _write_set(tmp_path, [GOOD, bad])
    with pytest.raises(QoqoptError, match=message) as info:
        load_jsonl(path)
    assert "\n" not in str(info.value)


def test_a_sets_own_reason_is_the_reference_replys_and_an_empty_one_is_none(tmp_path):
    """meta.reason is the <think> sentence of the reference reply (checked as chat text since the
    security review); an empty one gives the default sentence, as it did before that check."""
    from qoqopt.data import load_jsonl

    rows = [{**GOOD, "meta": {"reason": "The liver fills the right upper quadrant."}}, {**GOOD, "id": "b", "meta": {"reason": "  "}}]
    given, empty = load_jsonl(_write_set(tmp_path, rows))
    plain = load_jsonl(_write_set(tmp_path, [GOOD]))[0]
    assert "The liver fills the right upper quadrant." in given.target_text()
    assert empty.target_text() == plain.target_text() and "\\boxed{Liver}" in plain.target_text()


def test_every_bad_line_is_found_in_one_pass(tmp_path, capsys):
    """A set with several bad lines: export and bench name the first and how many more in one line;
    `data list --jsonl` (the checker) names each (it stopped at the first, one fix per run)."""
    from qoqopt.cli import main

    rows = [{**GOOD, "domain": "cat"}, GOOD, {**GOOD, "image": "b.png"}, {**GOOD, "id": "x"}, {**GOOD, "id": "x"}]
    path = _write_set(tmp_path, rows)
    first = "set.jsonl:1: unknown domain 'cat'"
    with pytest.raises(QoqoptError, match=rf"^.*{re.escape(first)} .*\) \(and 2 more bad lines: `qoqopt data list "
                                          rf"--jsonl .*set\.jsonl` names them\)$"):  # fmt: skip
        load_jsonl(path)
    capsys.readouterr()
    assert main(["data", "list", "--jsonl", path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and first in err[0] and "set.jsonl:3: image file not found" in err[1]
    assert err[2].endswith("set.jsonl:5: id 'x' is already used on line 4") and err[3] == f"error: {path}: 3 bad lines"
    # the wrong file (a CSV, a log) is bad on every line: it stops at 50 and says so
    (tmp_path / "scans.csv").write_text("id,image\n" * 200)
    assert main(["data", "list", "--jsonl", str(tmp_path / "scans.csv")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 51 and err[-1] == f"error: {tmp_path / 'scans.csv'}: 50+ bad lines (stopped at 50: is it a JSONL set?)"


def test_jsonl_reads_what_json_and_excel_write(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 raw inside strings (str.splitlines
    would cut the line there), Excel saves a BOM, an id may be a number."""
    rows = [{**GOOD, "question": "Which organ?\u2028Short answer\u0085please."}, {**GOOD, "id": 7}]
    path = tmp_path / "set.jsonl"
    _write_set(tmp_path, [])
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n")
    items = load_jsonl(path)
    assert [it.id for it in items] == ["set:1", "7"] and "\u2028Short" in items[0].question
    path.write_bytes(b"\xef\xbb\xbf\n\n" + "{\"question\": \"Qu\u00e9?\"}\n".encode("latin-1"))
    with pytest.raises(QoqoptError, match=r"set\.jsonl:3: not UTF-8 text \(byte 21\); save the set as UTF-8$"):
        load_jsonl(path)  # line and byte in the file as an editor shows it, the BOM counted


def test_jsonl_images_are_the_pixels_ask_gives(tmp_path):
    """A set's image is `ask --image`'s picture, resized: 16-bit greyscale reduced by its high byte
    (as llama.cpp reduces it; qoqopt.images is checked against llama.cpp's loader in test_gguf.py),
    and a DICOM named .png read as the DICOM it is."""
    from qoqopt.data.augment import resize_to
    from qoqopt.images import open_image

    ramp = np.linspace(0, 65535, 300 * 400).astype(np.uint16).reshape(300, 400)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    (tmp_path / "ct.png").write_bytes(open(catalog.source_path("CT_small.dcm"), "rb").read())
    items = load_jsonl(_write_set(tmp_path, [{**GOOD, "image": "g16.png"}, {**GOOD, "image": "ct.png", "domain": "ct"}]))
    # the ramp's high bytes (stb_image's rule for 16-bit PNG), written out here, resized as a set resizes
    high_byte = Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB")
    assert np.array_equal(np.asarray(items[0].image), np.asarray(resize_to(high_byte, items[0].image.size)))
    ask = open_image(tmp_path / "ct.png")  # a DICOM under a .png name: the DICOM's picture
    assert np.array_equal(np.asarray(items[1].image), np.asarray(resize_to(ask, items[1].image.size)))
    assert np.array_equal(np.asarray(ask), np.asarray(dicom_to_image(catalog.source_path("CT_small.dcm"))))


def test_jsonl_reads_an_ecg_by_what_the_file_holds(tmp_path):
    """A waveform DICOM is an ECG whatever field or domain names it; an image DICOM (a scanned ECG
    sheet) under domain ecg is an image."""
    ecg, ct = catalog.source_path("waveform_ecg.dcm"), catalog.source_path("CT_small.dcm")
    rows = [{**GOOD, "image": ecg, "domain": "ecg"}, {**_NO_IMAGE, "dicom": ct, "domain": "ecg"}]
    waveform, scanned = load_jsonl(_write_set(tmp_path, rows))
    assert waveform.ecg_signal.shape == (8, 2500) and waveform.image.width > waveform.image.height
    assert scanned.ecg_signal is None and scanned.image.mode == "RGB"


def test_a_jsonl_set_of_ecgs_keeps_their_signals_not_their_recordings(tmp_path):
    """Each ECG is decoded at load (a bad one fails there) but only its 80 KB encoder signal is kept;
    the recording (~1 MB: a 1000-ECG set held 1.1 GB) is read again when the sheet is drawn, the
    same sheet as drawn from the file itself."""
    import tracemalloc

    from qoqopt.data.ecg import render_ecg
    from qoqopt.data.jsonl import _sized

    ecg = catalog.source_path("waveform_ecg.dcm")
    path = _write_set(tmp_path, [{**GOOD, "image": ecg, "domain": "ecg", "id": f"e{i}"} for i in range(8)])
    tracemalloc.start()
    try:
        items = load_jsonl(path)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(items) < 200_000  # measured ~130 KB per ECG over 8 (1.06 MB holding each recording)
    assert np.array_equal(np.asarray(items[3].image), np.asarray(_sized(lambda: render_ecg(ecg), None, "")))


@pytest.mark.parametrize("hz", ["0", "1e-3", "2e4", "nan"])
def test_an_ecg_sampling_rate_no_ecg_has_is_refused_in_one_line(tmp_path, capsys, hz):
    """The ECG encoder's input is 10 s of samples at the file's SamplingFrequency: 3e6 Hz took
    2.7 GB, 2e8 asked for 119 GiB, 0 or 1e-3 Hz was a ValueError traceback. `data list` and `ask
    --image` refuse it in one line (rates that cost memory are not tried here)."""
    from qoqopt.images import open_image

    ds = pydicom.dcmread(catalog.source_path("waveform_ecg.dcm"))
    with warnings.catch_warnings():  # pydicom warns that "nan" is no decimal string: that is the point
        warnings.simplefilter("ignore")
        ds.WaveformSequence[0].SamplingFrequency = hz
    ds.save_as(tmp_path / "ecg.dcm")
    path = _write_set(tmp_path, [{**_NO_IMAGE, "dicom": "ecg.dcm", "domain": "ecg"}])
    why = f"{tmp_path / 'ecg.dcm'}: ECG SamplingFrequency {hz} Hz, outside the 50..10000 Hz an ECG is recorded at"
    assert refused(["data", "list", "--jsonl", path], capsys) == f"error: {path}:1: {why}"
    with pytest.raises(QoqoptError) as exc:
        open_image(tmp_path / "ecg.dcm")
    assert str(exc.value) == why


@pytest.mark.parametrize("hz", ["50", "10000"])
def test_the_ends_of_the_ecg_range_are_ecg_rates(tmp_path, hz):
    """50 and 10000 Hz are inside the range (a Holter's low rate, a high-resolution ECG's): pydicom's
    sample at either rate passes the header check a set's files get when it loads."""
    from qoqopt.images import check_image

    ds = pydicom.dcmread(catalog.source_path("waveform_ecg.dcm"))
    ds.WaveformSequence[0].SamplingFrequency = hz
    ds.save_as(tmp_path / "ecg.dcm")
    assert check_image(tmp_path / "ecg.dcm").WaveformSequence[0].SamplingFrequency == float(hz)


def test_jsonl_refuses_at_load_what_cannot_be_decoded(tmp_path):
    """A float TIFF and a 12-bit JPEG Extended DICOM (pydicom's own sample; neither Pillow nor gdcm
    decodes it) are refused when the set loads, not when calibration reaches them."""
    from pydicom.data import get_testdata_file

    Image.fromarray(np.ones((300, 400), np.float32)).save(tmp_path / "f.tif")
    jpeg12 = get_testdata_file("JPEG-lossy.dcm")
    assert pydicom.dcmread(jpeg12).BitsStored == 12
    for row, message in (({**GOOD, "image": "f.tif"}, "a floating-point image has no display range"),
                         ({**_NO_IMAGE, "dicom": jpeg12}, "12-bit JPEG Extended, which neither Pillow nor gdcm decodes")):  # fmt: skip
        with pytest.raises(QoqoptError, match=message):
            load_jsonl(_write_set(tmp_path, [row]))


def test_jsonl_bad_dicom_is_reported_with_its_line(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"not dicom")
    path = _write_set(tmp_path, [GOOD, {"dicom": "x.dcm", "question": "q", "answer": "a", "domain": "ct"}])
    with pytest.raises(QoqoptError, match=r"set\.jsonl:2: .*x\.dcm: not a DICOM file \(no DICM marker"):
        load_jsonl(path)


# ---- CLI ----------------------------------------------------------------------------------------
def _cli(*argv) -> int:
    from qoqopt.commands.data import register

    parser = argparse.ArgumentParser(prog="qoqopt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_show(tmp_path, capsys):
    assert _cli("data", "list", "--split", "eval", "--domain", "ecg") == 0
    out = capsys.readouterr().out
    assert "ecg-12lead.rhythm.eval-0" in out and "waveform_ecg.dcm" in out and "Sinus rhythm" in out
    assert out.strip().endswith("3 items: ecg 3")
    png = tmp_path / "ct.png"
    assert _cli("data", "show", "ct-head-693.region_ct.eval-0", "--out", str(png)) == 0
    out = capsys.readouterr().out
    assert Image.open(png).size == (308, 308)
    assert "Which body region is shown?" in out and "\\boxed{Head}" in out
    with pytest.raises(QoqoptError, match=r"unknown built-in image 'nope' \(`qoqopt data list` lists the ids\)"):
        _cli("data", "show", "nope.modality.eval-0", "--out", str(png))


def test_cli_jsonl_takes_domain_and_refuses_built_in_choices(tmp_path, capsys):
    """--domain filters a user set too; --split/--n-per-base pick from the built-in set, so beside
    --jsonl they are refused rather than ignored, and `show` has no --split (the id names it)."""
    path = _write_set(tmp_path, [GOOD, {**GOOD, "domain": "ct", "answer": "Kidney"}])
    assert _cli("data", "list", "--jsonl", path, "--domain", "ct") == 0
    out = capsys.readouterr().out
    assert "set:2" in out and "set:1" not in out and out.strip().endswith("1 items: ct 1")
    assert "Which organ?" in out and THINK_SUFFIX[:20] not in out  # a user item's own question
    with pytest.raises(QoqoptError, match="--domain pathology: the built-in set has ct, "):
        _cli("data", "list", "--domain", "pathology")  # a domain only a user set can have
    for flag in (("--split", "eval"), ("--n-per-base", "2")):
        with pytest.raises(QoqoptError, match="pick from the built-in set; a --jsonl set is listed whole"):
            _cli("data", "list", "--jsonl", path, *flag)
    err = refused(["data", "show", "ct-head-693.region_ct.eval-0", "--split", "calib", "--out", tmp_path / "x.png"], capsys)
    assert err == "error: unrecognized arguments: --split calib (see `qoqopt data show --help`)", err
    with pytest.raises(QoqoptError, match="no item with id 'set:3'; ids close to it: 'set:2', 'set:1'"):
        _cli("data", "show", "set:3", "--jsonl", path, "--out", str(tmp_path / "x.png"))
    with pytest.raises(QoqoptError, match="no item with id 'x'; its ids include 'set:1', 'set:2'$"):
        _cli("data", "show", "x", "--jsonl", path, "--out", str(tmp_path / "x.png"))


def test_cli_show_of_a_user_item_is_the_size_the_model_gets(tmp_path, capsys):
    """export and bench give a user image to the processor at its own size; `data show` must show
    that image, not one capped at the built-in set's 320 pixels. The size is the Qwen processor's own
    smart_resize of the source (transformers), which leaves it unchanged."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    path = _write_set(tmp_path, [GOOD])
    Image.new("RGB", (1000, 700), (90, 90, 90)).save(tmp_path / "a.png")
    png = tmp_path / "shown.png"
    assert _cli("data", "show", "set:1", "--jsonl", path, "--out", str(png)) == 0
    capsys.readouterr()
    h, w = pil.smart_resize(700, 1000, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert Image.open(png).size == (w, h) and max(w, h) > 320
    assert pil.smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (h, w)
    assert _cli("data", "show", "set:1", "--jsonl", path, "--out", str(png), "--max-side", "300", "--force") == 0
    assert abs(max(Image.open(png).size) - 300) <= 14  # the nearest multiple of 28


def test_cli_help_documents_the_jsonl_format_it_loads(tmp_path, capsys):
    """The example lines in `qoqopt data --help` are a set the loader takes as they are printed."""
    with pytest.raises(SystemExit):
        _cli("data", "--help")
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith('{"')]
    assert len(lines) == 3
    Image.new("RGB", (400, 300), (90, 90, 90)).save((tmp_path / "scans").mkdir() or tmp_path / "scans" / "a.png")
    for folder, name in (("mr", "MR_small.dcm"), ("ecg", "waveform_ecg.dcm")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name[:1].lower()}.dcm").write_bytes(open(catalog.source_path(name), "rb").read())
    (tmp_path / "mr" / "b.dcm").write_bytes((tmp_path / "mr" / "m.dcm").read_bytes())
    (tmp_path / "ecg" / "c.dcm").write_bytes((tmp_path / "ecg" / "w.dcm").read_bytes())
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")
    items = load_jsonl(tmp_path / "set.jsonl")
    assert [it.domain for it in items] == ["ct", "mri", "ecg"] and items[1].id == "mr-b"
    assert items[2].choices == ["AF", "Sinus"] and items[2].ecg_signal is not None
    assert items[0].target_text() == "<think>The image shows Head.</think>\n\\boxed{Head}"


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        _cli("data", "--help")
    assert "qoqopt data list --split eval" in capsys.readouterr().out
