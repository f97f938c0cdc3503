"""12-lead ECGs from DICOM waveforms: the raw signal QoQ-Med's ECG encoder takes, and a paper plot.

QoQ-Med sees an ECG two ways. Its own checkpoint has an ECG-JEPA encoder fed the raw signal; the
plain Qwen2.5-VL path (and GGUF, where llama.cpp has no ECG encoder) only sees a picture of the
ECG. So we keep both: :func:`ecg_signal` and :func:`render_ecg`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from qoqopt.data.dicom import read_dicom
from qoqopt.errors import QoqoptError

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# ECG-JEPA's input leads: III, aVR, aVL and aVF are linear combinations of I and II, so it drops them.
ENCODER_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
# ECG-JEPA's input: 10 s resampled to 2500 points (its loaders take 10 s at 500 Hz = 5000 samples,
# then resample to 2500), i.e. 250 samples per second of signal.
ENCODER_SECONDS = 10.0
ENCODER_SAMPLES = 2500

_TO_MV = {"uV": 1e-3, "mV": 1.0, "V": 1e3}  # UCUM codes of Channel Sensitivity Units


@dataclass(frozen=True)
class EcgRecording:
    """One multiplex group of a DICOM ECG, in millivolts and the standard lead order."""

    signals: np.ndarray  # (12, samples) float64, mV, in STANDARD_LEADS order
    fs: float  # samples per second
    source: str
    statements: tuple[str, ...] = ()  # free-text interpretation, e.g. ("RITMO SINUSALE", ...)
    measurements: dict[str, float] = field(default_factory=dict)  # e.g. {"RR Interval": 982.0} (ms)

    @property
    def duration_s(self) -> float:
        return self.signals.shape[1] / self.fs

    def lead(self, name: str) -> np.ndarray:
        return self.signals[STANDARD_LEADS.index(name)]


def default_ecg_path() -> str:
    """pydicom's bundled real 12-lead resting ECG (10 s at 1000 Hz)."""
    path = get_testdata_file("waveform_ecg.dcm", download=False)
    if path is None:
        raise QoqoptError("pydicom's test file waveform_ecg.dcm is missing; reinstall pydicom")
    return str(path)


def read_ecg(src: str | Path | Dataset | None = None) -> EcgRecording:
    """The rhythm (original, >= 8 leads) multiplex group of an ECG DICOM, leads in standard order."""
    ds = read_dicom(default_ecg_path() if src is None else src)
    index, group = _rhythm_group(ds)
    raw = ds.waveform_array(index)  # (samples, channels), sensitivity and baseline applied
    by_name = {}
    for ch, channel in enumerate(group.ChannelDefinitionSequence):
        name = _lead_name(channel)
        units = channel.ChannelSensitivityUnitsSequence[0].CodeValue
        if units not in _TO_MV:
            raise QoqoptError(f"{_source(ds)}: lead {name} has unsupported units {units!r}")
        by_name[name] = raw[:, ch] * _TO_MV[units]
    signals = np.stack([_lead_or_derived(by_name, lead, _source(ds)) for lead in STANDARD_LEADS])
    return EcgRecording(
        signals=signals,
        fs=float(group.SamplingFrequency),
        source=_source(ds),
        statements=_statements(ds),
        measurements=_measurements(ds),
    )


def ecg_signal(
    src: str | Path | Dataset | EcgRecording | None = None,
    n_samples: int = ENCODER_SAMPLES,
    seconds: float = ENCODER_SECONDS,
) -> np.ndarray:
    """(8, n_samples) float32 in mV: leads I, II, V1-V6 over the first `seconds`, resampled.

    A shorter recording is zero-padded at the end, as the encoder's fixed-length input needs.
    """
    rec = src if isinstance(src, EcgRecording) else read_ecg(src)
    leads = rec.signals[[STANDARD_LEADS.index(n) for n in ENCODER_LEADS]]
    n_src = int(round(seconds * rec.fs))
    window = np.zeros((len(ENCODER_LEADS), n_src))
    take = min(n_src, leads.shape[1])
    window[:, :take] = leads[:, :take]
    return resample(window, n_samples).astype(np.float32)


def resample(x: np.ndarray, n_out: int) -> np.ndarray:
    """Fourier resampling along the last axis (ideal low-pass, so no aliasing when downsampling).

    This is also how ECG-JEPA's own data pipeline resamples, so the encoder sees what it expects.
    """
    n_in = x.shape[-1]
    spectrum = np.fft.rfft(x, axis=-1)
    keep = min(spectrum.shape[-1], n_out // 2 + 1)
    out = np.zeros(x.shape[:-1] + (n_out // 2 + 1,), dtype=complex)
    out[..., :keep] = spectrum[..., :keep]
    return np.fft.irfft(out, n=n_out, axis=-1) * (n_out / n_in)


def r_peaks(x: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of R waves in one lead with dominant upright QRS (lead II is the usual one).

    Each run above half the tallest deflection is one beat; runs closer than 200 ms (the
    physiological refractory period) are merged.
    """
    x = x - np.median(x)
    above = np.concatenate([[False], x > 0.5 * x.max(), [False]])
    starts = np.flatnonzero(~above[:-1] & above[1:])
    ends = np.flatnonzero(above[:-1] & ~above[1:])
    peaks: list[int] = []
    for s, e in zip(starts, ends):
        p = s + int(np.argmax(x[s:e]))
        if peaks and p - peaks[-1] < 0.2 * fs:
            if x[p] > x[peaks[-1]]:
                peaks[-1] = p
            continue
        peaks.append(p)
    return np.asarray(peaks, dtype=np.int64)


def heart_rate(rec: EcgRecording) -> float:
    """Beats per minute from the median RR interval of lead II."""
    peaks = r_peaks(rec.lead("II"), rec.fs)
    if len(peaks) < 2:
        raise QoqoptError(f"{rec.source}: fewer than two R waves found in lead II")
    return 60.0 * rec.fs / float(np.median(np.diff(peaks)))


# ---- the paper plot -----------------------------------------------------------------------------
# Standard 12-lead print: 25 mm/s, 10 mm/mV; four 2.5 s columns (I-III, aVR-aVF, V1-V3, V4-V6)
# over three rows, then a full 10 s lead II rhythm strip. Sizes are in millimetres of paper.
_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
_RHYTHM_LEAD = "II"
MM_PER_S, MM_PER_MV = 25.0, 10.0
_LEFT, _RIGHT, _TOP, _ROW, _BOTTOM = 15.0, 5.0, 5.0, 40.0, 10.0
PAPER_MM = (_LEFT + 10.0 * MM_PER_S + _RIGHT, _TOP + 4 * _ROW + _BOTTOM)  # (270, 175)

PAPER_RGB = (255, 243, 243)
_MINOR = (246, 196, 196)
_MAJOR = (226, 120, 120)
_INK = (20, 20, 20)


def render_ecg(src: str | Path | Dataset | EcgRecording | None = None, px_per_mm: float = 4.0) -> Image.Image:
    """The ECG as a printed 12-lead sheet (PIL RGB, PAPER_MM * px_per_mm pixels).

    Drawn at twice the resolution and reduced, which anti-aliases the 1 mm grid and the traces.
    """
    rec = src if isinstance(src, EcgRecording) else read_ecg(src)
    if rec.duration_s < 10.0 - 1e-6:
        raise QoqoptError(f"{rec.source}: the 12-lead layout needs 10 s, the recording has {rec.duration_s:.1f} s")
    s = 2.0 * px_per_mm
    size = (int(round(PAPER_MM[0] * s)), int(round(PAPER_MM[1] * s)))
    img = Image.new("RGB", size, PAPER_RGB)
    draw = ImageDraw.Draw(img)
    _draw_grid(draw, size, s)
    font = _font(max(8, int(round(3.5 * s))))
    width = max(1, int(round(0.3 * s)))
    for row, leads in enumerate(_LAYOUT):
        base_y = _TOP + _ROW * (row + 0.5)
        _draw_calibration(draw, base_y, s, width)
        for col, lead in enumerate(leads):
            t0 = 2.5 * col
            _draw_trace(draw, rec, lead, t0, t0 + 2.5, base_y, s, width)
            x = (_LEFT + t0 * MM_PER_S) * s
            draw.text((x + 1.0 * s, (base_y - 15.0) * s), lead, fill=_INK, font=font)
            if col:  # lead-change marker between columns, as printers draw it
                draw.line([(x, (base_y - 4) * s), (x, (base_y + 4) * s)], fill=_INK, width=width)
    base_y = _TOP + _ROW * 3.5
    _draw_calibration(draw, base_y, s, width)
    _draw_trace(draw, rec, _RHYTHM_LEAD, 0.0, 10.0, base_y, s, width)
    draw.text(((_LEFT + 1) * s, (base_y - 15.0) * s), _RHYTHM_LEAD, fill=_INK, font=font)
    footer = f"25 mm/s   10 mm/mV   {rec.fs:.0f} Hz"
    draw.text(((_LEFT + 1) * s, (PAPER_MM[1] - _BOTTOM + 2.5) * s), footer, fill=_INK, font=font)
    return img.resize((size[0] // 2, size[1] // 2), Image.Resampling.LANCZOS)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _draw_grid(draw: ImageDraw.ImageDraw, size: tuple[int, int], s: float) -> None:
    """1 mm minor and 5 mm major lines (0.04 s / 0.1 mV and 0.2 s / 0.5 mV)."""
    for major in (False, True):
        colour, width = (_MAJOR, max(1, int(round(0.25 * s)))) if major else (_MINOR, 1)
        step = 5 if major else 1
        for mm in range(0, int(PAPER_MM[0]) + 1, step):
            x = round(mm * s)
            draw.line([(x, 0), (x, size[1])], fill=colour, width=width)
        for mm in range(0, int(PAPER_MM[1]) + 1, step):
            y = round(mm * s)
            draw.line([(0, y), (size[0], y)], fill=colour, width=width)


def _draw_calibration(draw: ImageDraw.ImageDraw, base_y: float, s: float, width: int) -> None:
    """The 1 mV, 0.2 s square pulse at the start of each row: proof of 10 mm/mV."""
    x0, x1, x2, x3 = 4.0, 6.0, 6.0 + 0.2 * MM_PER_S, 13.0
    top = base_y - MM_PER_MV
    pts = [(x0, base_y), (x1, base_y), (x1, top), (x2, top), (x2, base_y), (x3, base_y)]
    draw.line([(x * s, y * s) for x, y in pts], fill=_INK, width=width)


def _draw_trace(draw, rec: EcgRecording, lead: str, t0: float, t1: float, base_y: float, s: float, width: int):
    i0, i1 = int(round(t0 * rec.fs)), int(round(t1 * rec.fs))
    v = rec.lead(lead)[i0:i1]
    v = v - np.median(rec.lead(lead))  # centre on the isoelectric line (removes any DC offset)
    x = (_LEFT + (t0 + np.arange(len(v)) / rec.fs) * MM_PER_S) * s
    y = (base_y - v * MM_PER_MV) * s
    draw.line(list(zip(x.tolist(), y.tolist())), fill=_INK, width=width, joint="curve")


# ---- DICOM waveform details ---------------------------------------------------------------------
def _rhythm_group(ds: Dataset) -> tuple[int, Dataset]:
    """The group holding the recorded leads (not derived median beats)."""
    groups = list(ds.get("WaveformSequence", []))
    for i, group in enumerate(groups):
        if group.get("WaveformOriginality", "ORIGINAL") == "ORIGINAL" and group.NumberOfWaveformChannels >= 8:
            return i, group
    raise QoqoptError(f"{_source(ds)}: no original multiplex group with at least 8 ECG leads")


def _lead_name(channel: Dataset) -> str:
    """'Lead I (Einthoven)' / 'Lead aVR' / 'V1' -> the standard spelling 'I', 'aVR', 'V1'."""
    text = channel.ChannelSourceSequence[0].CodeMeaning
    text = re.sub(r"\(.*?\)", "", text).replace("Lead", "").strip()
    canonical = {name.upper(): name for name in STANDARD_LEADS}
    return canonical.get(text.upper(), text)


def _lead_or_derived(by_name: dict[str, np.ndarray], lead: str, source: str) -> np.ndarray:
    """A recorded lead, or a limb lead derived from I and II (Einthoven's and Goldberger's laws)."""
    if lead in by_name:
        return by_name[lead]
    i, ii = by_name.get("I"), by_name.get("II")
    if i is None or ii is None or lead.startswith("V"):
        raise QoqoptError(f"{source}: ECG lacks lead {lead}")
    return {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}[lead]


def _statements(ds: Dataset) -> tuple[str, ...]:
    seq = ds.get("WaveformAnnotationSequence", [])
    return tuple(str(a.UnformattedTextValue) for a in seq if a.get("UnformattedTextValue"))


def _measurements(ds: Dataset) -> dict[str, float]:
    """Global measurements the device wrote, e.g. RR/PR/QRS/QT intervals (ms) and axes (deg)."""
    out: dict[str, float] = {}
    for a in ds.get("WaveformAnnotationSequence", []):
        if a.get("NumericValue") is not None and a.get("ConceptNameCodeSequence"):
            out.setdefault(str(a.ConceptNameCodeSequence[0].CodeMeaning), float(a.NumericValue))
    return out


def _source(ds: Dataset) -> str:
    return str(getattr(ds, "filename", None) or "<in-memory DICOM>")
