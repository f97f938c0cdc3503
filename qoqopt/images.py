"""A user's image file (PNG, JPEG, TIFF, ... or DICOM) as the 8-bit RGB picture a model is given.

Pillow's own ``convert("RGB")`` clips 16-bit greyscale at 255, so a 16-bit PNG or TIFF (a common
export from PACS viewers and detectors) became almost all white. Here 16-bit values keep their
range, reduced to 8 bits by their high byte as llama.cpp's image loader (stb_image) does, so the
picture is the one LM Studio and llama-mtmd-cli see in the same file. The EXIF orientation is
applied, as transformers' ``load_image`` and every viewer do (stb_image ignores it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qoqopt.errors import QoqoptError

DICOM_SUFFIXES = (".dcm", ".dicom")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_ASPECT = 200  # transformers' smart_resize: "absolute aspect ratio must be smaller than 200"


def is_dicom(path: Path) -> bool:
    """By suffix, or by the "DICM" marker after the 128-byte preamble (DICOM PS3.10 7.1): files
    exported from a PACS are often named by their UID, with no suffix."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def open_image(path: str | Path) -> Image.Image:
    """The file's picture as PIL RGB; anything unreadable is a one-line QoqoptError naming the file."""
    path = _existing(path)
    if is_dicom(path):
        return open_dicom(path)
    try:
        with Image.open(path) as img:
            return _fits_processor(_to_rgb8(ImageOps.exif_transpose(img), path), path)
    except Image.DecompressionBombError as exc:
        raise QoqoptError(f"{path}: too many pixels for a safe decode ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise QoqoptError(f"{path}: not an image Pillow can read, nor a DICOM file ({exc.__class__.__name__})") from None


def open_dicom(path: str | Path) -> Image.Image:
    """An image DICOM as a viewer shows it (qoqopt.data.dicom); an ECG waveform DICOM (no pixel
    data) as the 12-lead paper sheet QoQ-Med reads ECGs from, as the clinical sets draw it."""
    from qoqopt.data.dicom import dicom_to_image, read_dicom
    from qoqopt.data.ecg import render_ecg

    path = _existing(path)
    ds = read_dicom(path)
    if "PixelData" not in ds and "WaveformSequence" in ds:
        return render_ecg(ds)
    return _fits_processor(dicom_to_image(ds), path)


def check_image(path: str | Path, dicom: bool = False) -> None:
    """What can be known of an image file from its header alone: it exists, it is a DICOM or an
    image Pillow identifies, and its size is one the processor takes. For sets that are checked
    whole before long work starts; pixels are decoded when an item is used."""
    import pydicom

    path = _existing(path)
    if dicom or is_dicom(path):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            raise QoqoptError(f"{path}: not a readable DICOM file ({exc.__class__.__name__})") from None
        if "Rows" in ds and "Columns" in ds:
            _check_aspect(int(ds.Columns), int(ds.Rows), path)
        elif "WaveformSequence" not in ds:
            raise QoqoptError(f"{path}: DICOM has neither an image nor a waveform (Modality {ds.get('Modality', '?')})")
        return
    try:
        with Image.open(path) as img:
            _check_aspect(*img.size, path)
    except Image.DecompressionBombError as exc:
        raise QoqoptError(f"{path}: too many pixels for a safe decode ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise QoqoptError(f"{path}: not an image Pillow can read, nor a DICOM file ({exc.__class__.__name__})") from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise QoqoptError(f"{path} is a directory; give one image or DICOM file")
    if not path.is_file():
        raise QoqoptError(f"{path}: no such file")
    return path


def _fits_processor(img: Image.Image, path: Path) -> Image.Image:
    _check_aspect(img.width, img.height, path)
    return img


def _check_aspect(width: int, height: int, path: Path) -> None:
    """Qwen2.5-VL's processor refuses a picture whose sides differ by more than MAX_ASPECT times."""
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        raise QoqoptError(f"{path}: {width}x{height} pixels: sides more than {MAX_ASPECT} times apart, which "
                          "Qwen2.5-VL's image processor refuses; crop it")  # fmt: skip


def _to_rgb8(img: Image.Image, path: Path) -> Image.Image:
    if img.mode == "F":
        raise QoqoptError(f"{path}: a floating-point image has no display range; save it as 8 or 16 bits")
    if img.mode not in _SIXTEEN_BIT:
        return img.convert("RGB")
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    if values.max() < 4096:
        print(f"warning: {path} is a 16-bit image that uses at most 12 bits: it is shown dark, as llama.cpp "
              "and LM Studio show it; give the DICOM, or export the image scaled to 16 bits", file=sys.stderr)  # fmt: skip
    return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
