"""The built-in base images: real clinical files from pydicom and pydicom-data, with their labels.

Each label either comes from the file's own DICOM metadata (quoted in the comment next to it) or,
where the metadata is silent, from looking at the image; every question asks something a reader
can see in the pixels. A source file yields one or more *views* (a rendering: a frame, a CT
window), and each view is asked one or more question types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from PIL import Image
from pydicom.data import get_testdata_file

from qoqopt.data.augment import AugmentLimits
from qoqopt.data.dicom import WINDOW_PRESETS, dicom_to_image
from qoqopt.data.ecg import PAPER_RGB, ecg_signal, heart_rate, read_ecg, render_ecg
from qoqopt.errors import QoqoptError


@dataclass(frozen=True)
class Source:
    key: str  # stable short name, the start of every item id built from it
    domain: str
    file: str  # file name inside pydicom's test data or the pydicom-data package
    labels: dict[str, str]  # question type -> answer
    frames: tuple[int | None, ...] = (None,)  # multi-frame: these frames become separate base images
    window: tuple[float, float] | None = None  # None: the file's own VOI (or the CT default)
    ct_windows: bool = False  # also render each WINDOW_PRESETS entry and ask which one it is
    flip: bool = False  # a mirrored image is still a valid example (no text, laterality not asked)


SOURCES: tuple[Source, ...] = (
    # -- CT ---------------------------------------------------------------------------------------
    # Head: SeriesDescription "5/5mm Plain", window 40/100 (a brain window), axial.
    Source("ct-head-693", "ct", "693_UNCR.dcm", {"modality": "CT", "region_ct": "Head"}, ct_windows=True),
    # Head at the skull base: BodyPartExamined "HEAD" (JPEG 2000, decoded by Pillow's OpenJPEG).
    Source("ct-head-lv2", "ct", "J2K_pixelrep_mismatch.dcm", {"modality": "CT", "region_ct": "Head"}, ct_windows=True),
    # Abdomen: BodyPartExamined "PANCREAS", StudyDescription "Pancreas"; kidneys and bowel visible.
    Source("ct-abd-pancreas", "ct", "explicit_VR-UN.dcm", {"modality": "CT", "region_ct": "Abdomen"}, ct_windows=True),
    # A 128x128 crop centred on a thoracic vertebra (no body-part tag; the spine fills the image).
    Source("ct-spine-small", "ct", "CT_small.dcm", {"modality": "CT", "region_ct": "Spine"}, ct_windows=True),
    # -- MRI --------------------------------------------------------------------------------------
    # StudyDescription "SHOULDER", T1 SE. Orientation is coronal oblique (35 deg, along the
    # supraspinatus), which is read as coronal.
    Source(
        "mr-shoulder", "mri", "MR2_UNCR.dcm",
        {"modality": "MRI", "region_mri": "Shoulder", "plane": "Coronal"}, flip=True,
    ),
    # BodyPartExamined "ABDOMEN", "t1_vibe_fs_tra" (tra = axial), ImageOrientation [1,0,0,0,1,0].
    Source(
        "mr-abdomen", "mri", "MR-SIEMENS-DICOM-WithOverlays.dcm",
        {"modality": "MRI", "region_mri": "Abdomen", "plane": "Axial"},
    ),
    # Enhanced MR, BodyPartExamined "HEAD", 10 frames of midline sagittal brain (corpus callosum).
    Source(
        "mr-head-sag", "mri", "emri_small.dcm",
        {"modality": "MRI", "region_mri": "Head", "plane": "Sagittal"}, frames=(2, 7), flip=True,
    ),
    # -- Ultrasound -------------------------------------------------------------------------------
    # ImageType "SMALL PARTS"; "LYMPH NODE" is burned into the image, colour flow box over it.
    Source(
        "us-lymph-doppler", "ultrasound", "US1_UNCR.dcm",
        {"modality": "Ultrasound", "region_ultrasound": "Lymph node", "mode": "Colour Doppler"},
    ),
    # StudyDescription "Echocardiogram", SeriesDescription "Transesophageal Echocardiogram".
    Source(
        "us-tee-doppler", "ultrasound", "color-pl.dcm",
        {"modality": "Ultrasound", "region_ultrasound": "Heart", "mode": "Colour Doppler"},
    ),
    # SonoSite cardiac clip, 120 frames (YBR_FULL_422 JPEG): parasternal long axis ("PLA" burned
    # in), grey scale. Three frames across the clip are three base images (different phases).
    Source(
        "us-echo-b", "ultrasound", "color3d_jpeg_baseline.dcm",
        {"modality": "Ultrasound", "region_ultrasound": "Heart", "mode": "B-mode"}, frames=(20, 60, 100),
    ),
    # ALOKA, ImageType "ABDOM/RAD", "PELVIS" burned in; 16-bit palette colour, grey-scale content.
    Source(
        "us-pelvis-b", "ultrasound", "gdcm-US-ALOKA-16.dcm",
        {"modality": "Ultrasound", "region_ultrasound": "Pelvis", "mode": "B-mode"},
    ),
    # -- X-ray ------------------------------------------------------------------------------------
    # CR, BodyPartExamined "CHEST", ViewPosition "PA", MONOCHROME1 (inverted on display).
    Source("xr-chest-pa", "xray", "RG1_UNCR.dcm", {"modality": "X-ray", "region_xray": "Chest", "view": "PA"}),
    # CR, "Non-ossifying fibroma of distal tibia", BodyPartExamined "EXTREMITY", ViewPosition "AP".
    Source("xr-leg-ap", "xray", "RG3_UNCR.dcm", {"modality": "X-ray", "region_xray": "Leg", "view": "AP"}),
    # -- ECG --------------------------------------------------------------------------------------
    # Real 12-lead resting ECG, 10 s at 1000 Hz. The device's own statement is "RITMO SINUSALE"
    # (sinus rhythm); its RR interval of 982 ms is 61 /min, a normal rate (60-100).
    Source("ecg-12lead", "ecg", "waveform_ecg.dcm", {"modality": "ECG", "rhythm": "Sinus rhythm", "rate": "Normal"}),
)

# Per-domain augmentation limits: a photographed ECG is rarely turned far, and its paper is white.
LIMITS = {
    "ecg": AugmentLimits(rotation=4.0, min_crop=0.92, fill=PAPER_RGB),
}


def limits_for(source: Source) -> AugmentLimits:
    return replace(LIMITS.get(source.domain, AugmentLimits()), flip=source.flip)


@dataclass(frozen=True)
class View:
    """One base image: a rendering of a source, and the question types asked about it."""

    key: str
    source: Source
    qtypes: tuple[str, ...]
    frame: int | None = None
    window: tuple[float, float] | None = None
    labels: dict[str, str] = field(default_factory=dict)


def views() -> list[View]:
    """Every base image of the built-in set, in a fixed order."""
    out: list[View] = []
    for src in SOURCES:
        for frame in src.frames:
            key = src.key if frame is None else f"{src.key}-f{frame}"
            out.append(View(key, src, tuple(src.labels), frame, src.window, dict(src.labels)))
        if src.ct_windows:
            # The same slice under each preset: the window is what changes, so it is the question.
            for name, window in WINDOW_PRESETS.items():
                wkey = f"{src.key}-w{name.split()[0].lower()}"
                out.append(View(wkey, src, ("window",), src.frames[0], window, {"window": name}))
    return out


@lru_cache(maxsize=None)
def source_path(name: str) -> str:
    """Absolute path of a pydicom / pydicom-data test file, never downloading anything."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise QoqoptError(f"built-in data file {name} not found: install pydicom and pydicom-data")
    return str(path)


@lru_cache(maxsize=64)
def base_image(view_key: str, work_side: int) -> Image.Image:
    """The view rendered once and reduced to about `work_side` pixels on its longer side.

    Augmentations then resample this small copy, so a 7 MB radiograph is decoded once per process.
    """
    view = _views_by_key()[view_key]
    path = source_path(view.source.file)
    if view.source.domain == "ecg":
        img = render_ecg(path)
    else:
        img = dicom_to_image(path, frame=view.frame, window=view.window)
    scale = work_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


@lru_cache(maxsize=1)
def ecg_facts() -> dict:
    """The built-in ECG's raw signal and the facts its labels rest on (computed, not assumed)."""
    rec = read_ecg(source_path("waveform_ecg.dcm"))
    return {
        "signal": ecg_signal(rec),
        "heart_rate_bpm": heart_rate(rec),
        "statements": rec.statements,
        "fs": rec.fs,
        "duration_s": rec.duration_s,
    }


@lru_cache(maxsize=1)
def _views_by_key() -> dict[str, View]:
    return {v.key: v for v in views()}


def view_by_key(key: str) -> View:
    try:
        return _views_by_key()[key]
    except KeyError:
        raise QoqoptError(f"unknown built-in image {key!r}") from None
