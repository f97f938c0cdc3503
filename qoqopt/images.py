"""A user's image file (PNG, JPEG, TIFF, ... or DICOM) as the 8-bit RGB picture a model is given.

Pillow's own ``convert("RGB")`` clips 16-bit greyscale at 255, so a 16-bit PNG or TIFF (a common
export from PACS viewers and detectors) became almost all white. Here 16-bit values keep their
range, reduced to 8 bits by their high byte, as llama.cpp's image loader (stb_image) reduces a
16-bit PNG: the picture LM Studio and llama-mtmd-cli see in the same PNG (they cannot read TIFF).
The EXIF orientation is applied, as transformers' ``load_image`` and every viewer do (stb_image
ignores it).
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qoqopt.errors import QoqoptError

DICOM_SUFFIXES = (".dcm", ".dicom")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_ASPECT = 200  # transformers' smart_resize: "absolute aspect ratio must be smaller than 200"
ECG_HZ = (50, 10_000)  # the sampling rates an ECG is recorded at, with room (250-1000 Hz is usual)


def is_dicom(path: Path) -> bool:
    """By suffix, or by the "DICM" marker after the 128-byte preamble (DICOM PS3.10 7.1): files
    exported from a PACS are often named by their UID, with no suffix. A dataset stored without
    the preamble (IM0001 from an older PACS) starts with a group 0008 element instead; unlike the
    marker, those two bytes prove nothing, so such a file is read as DICOM only when it holds an
    image or a waveform (data.dicom.read_dicom)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or head[:2] == b"\x08\x00"


def open_image(path: str | Path, frame: int | None = None) -> Image.Image:
    """The file's picture as PIL RGB; anything unreadable is a one-line QoqoptError naming the file.
    ``frame`` picks one of several (default: a DICOM's middle frame, another file's first)."""
    path = _existing(path)
    if is_dicom(path):
        return open_dicom(path, frame)
    with _pillow(path) as img:
        _seek(img, frame, path)
        # the TIFF tags are read here: exif_transpose returns an image without them
        white_is_zero = getattr(img, "tag_v2", {}).get(262) == 0
        return _fits_processor(_to_rgb8(ImageOps.exif_transpose(img), path, white_is_zero), path)


def open_dicom(path: str | Path, frame: int | None = None) -> Image.Image:
    """An image DICOM as a viewer shows it (qoqopt.data.dicom); an ECG waveform DICOM as the
    12-lead paper sheet QoQ-Med reads ECGs from, as the clinical sets draw it."""
    from qoqopt.data.dicom import read_dicom

    with _quiet(), _dicom_values(path):
        ds = read_dicom(_existing(path))
        return _dicom_picture(ds, path, frame)


@contextmanager
def _dicom_values(path):
    """pydicom's failures on attribute values it cannot use (a Modality LUT of 12-bit entries, two
    rescale slopes, an orientation that is no number, an ECG channel without its units) as one line
    naming the file, not a traceback mid-export; the checks before this name the common ones."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise QoqoptError(f"{path}: a DICOM attribute qoqopt cannot use ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())})") from None


def _dicom_picture(ds, path: Path, frame: int | None) -> Image.Image:
    from qoqopt.data.dicom import dicom_to_image
    from qoqopt.data.ecg import render_ecg

    if is_waveform(ds):
        _check_waveform(ds, frame, path)
        return render_ecg(ds)
    _check_dicom_size(ds, path)  # before a decode that could take all memory
    return _fits_processor(dicom_to_image(ds, frame), path)


def _check_dicom_size(ds, path: Path) -> None:
    """A DICOM frame is refused past the pixel count where Pillow refuses a PNG (a decompression
    bomb): a 20000 x 20000 frame took 10 GB on its way to 8-bit RGB."""
    if "Rows" not in ds or "Columns" not in ds:
        raise QoqoptError(f"{path}: DICOM has neither an image nor a waveform (Modality {ds.get('Modality', '?')})")
    width, height = int(ds.Columns), int(ds.Rows)
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise QoqoptError(f"{path}: {width}x{height} pixels, more than {2 * Image.MAX_IMAGE_PIXELS:,} a frame, which "
                          "Pillow refuses in a PNG as a decompression bomb; downscale it first")  # fmt: skip
    _check_aspect(width, height, path)


def is_waveform(ds) -> bool:
    """A waveform DICOM (an ECG) rather than an image; true of a header read without pixels too."""
    return "WaveformSequence" in ds and "Rows" not in ds


def check_image(path: str | Path, dicom: bool = False, frame: int | None = None):
    """What can be known of an image file from its header alone: it exists, it is a DICOM whose
    pixels a decoder here reads (or a waveform), or an image Pillow identifies in a mode with a
    display range, and its size is one the processor takes. For sets that are checked whole
    before long work starts; pixels are decoded when an item is used. Returns a DICOM's header
    (pixels not read), so the caller need not read it again; None for other files."""
    from qoqopt.data.dicom import display_view, frame_index, frame_view, read_dicom

    path = _existing(path)
    if dicom or is_dicom(path):
        with _quiet(), _dicom_values(path):
            ds = read_dicom(path, stop_before_pixels=True)
            if is_waveform(ds):
                _check_waveform(ds, frame, path)
                return ds
            _check_decodable(ds, path)
            _check_dicom_size(ds, path)
            # the frame count and the functional groups agree; rescale and window are numbers
            display_view(frame_view(ds, frame_index(ds, frame)))
        return ds
    with _pillow(path) as img:
        _seek(img, frame, path)
        _check_mode(img, path)
        _check_aspect(*img.size, path)
    return None


@contextmanager
def _quiet():
    """pydicom warns about each value that breaks the standard, on stderr, before qoqopt's own
    one-line verdict on the file; the verdict is what the user needs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _pillow(path: Path):
    """The file opened by Pillow (header read, pixels on demand), its failures as one line."""
    try:
        with warnings.catch_warnings():  # Pillow's two-line warning, said in one below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            pixels, limit = img.width * img.height, Image.MAX_IMAGE_PIXELS
            if limit and pixels > limit:
                print(f"warning: {path}: {img.width}x{img.height} is {pixels:,} pixels, over Pillow's "
                      f"{limit:,}-pixel decompression-bomb limit; decoding it takes much memory", file=sys.stderr)  # fmt: skip
            yield img
    except Image.DecompressionBombError as exc:
        raise QoqoptError(f"{path}: too many pixels for a safe decode ({exc}); downscale it first") from None
    except UnidentifiedImageError as exc:
        raise QoqoptError(f"{path}: not an image Pillow can read, nor a DICOM file ({exc.__class__.__name__})") from None
    except OSError as exc:  # Pillow knew the format and failed in the data: say how ("image file is truncated")
        raise QoqoptError(f"{path}: not an image Pillow can read, nor a DICOM file ({' '.join(str(exc).split())})") from None


def _check_waveform(ds, frame: int | None, path: Path) -> None:
    from qoqopt.data.ecg import _rhythm_group as rhythm_group  # the group render_ecg reads

    if frame is not None:
        raise QoqoptError(f"{path}: an ECG waveform has no frames to pick from")
    _check_sampling(rhythm_group(ds)[1], path)  # the group the ECG is read from; others (median beats) are not


def _check_sampling(group, path: Path) -> None:
    """A multiplex group's SamplingFrequency must be an ECG's: the ECG encoder's input is 10 s of
    samples at that rate (3e6 Hz took 2.7 GB, 2e8 Hz asked for 119 GiB, 0 Hz was a ValueError)."""
    text = group.get("SamplingFrequency")
    if text is None:
        raise QoqoptError(f"{path}: the ECG has no SamplingFrequency")
    try:
        hz = float(text)
    except (TypeError, ValueError):
        hz = float("nan")
    if not ECG_HZ[0] <= hz <= ECG_HZ[1]:  # a NaN fails it too
        raise QoqoptError(f"{path}: ECG SamplingFrequency {text} Hz, outside the {ECG_HZ[0]}..{ECG_HZ[1]} Hz an "
                          "ECG is recorded at")  # fmt: skip


def _seek(img: Image.Image, frame: int | None, path: Path) -> None:
    """Frame ``frame`` of a multi-frame image (a GIF, a TIFF stack)."""
    if frame is None:
        return
    n = getattr(img, "n_frames", 1)
    if not 0 <= frame < n:
        raise QoqoptError(f"{path}: frame {frame} out of range (it has {n})")
    img.seek(frame)


def _check_decodable(ds, path: Path) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if syntax is None:
        return  # decode_frame takes such a file as explicit VR little endian
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise QoqoptError(f"{path}: pixel data in {syntax.name}, which pydicom cannot decode") from None
    if not decoder.is_available:
        needs = " ".join("; ".join(decoder.missing_dependencies).split())
        raise QoqoptError(f"{path}: no decoder for {syntax.name} is installed ({needs})")
    if syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
        raise QoqoptError(f"{path}: 12-bit JPEG Extended, which neither Pillow nor gdcm decodes here; "
                          "export the image uncompressed or lossless")  # fmt: skip


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


def _check_mode(img: Image.Image, path: Path) -> None:
    if img.mode == "F":
        raise QoqoptError(f"{path}: a floating-point image has no display range; save it as 8 or 16 bits")
    if img.mode == "LAB":  # Pillow's LAB to RGB copies the bands across (a mid grey came out bright blue)
        raise QoqoptError(f"{path}: a CIELAB image, which Pillow cannot convert to RGB; save it as RGB")


def _to_rgb8(img: Image.Image, path: Path, white_is_zero: bool = False) -> Image.Image:
    _check_mode(img, path)
    if img.mode not in _SIXTEEN_BIT:
        return _on_white(img)
    values = np.asarray(img, dtype=np.int64)
    if values.min() < 0:  # signed (a TIFF of Hounsfield units, say): no display window is known
        raise QoqoptError(f"{path}: signed values ({values.min()}..{values.max()}) have no display range; give the "
                          "DICOM (its window is read) or save the image as unsigned 8 or 16 bits")  # fmt: skip
    if values.max() > 65535:  # mode I holds 32-bit integers
        raise QoqoptError(f"{path}: values up to {values.max()} do not fit 16 bits; save it as 8 or 16 bits")
    if 0 < values.max() < 4096:
        print(f"warning: {path} is a 16-bit image that uses at most 12 bits: it is shown dark, as llama.cpp "
              "and LM Studio show it; give the DICOM, or export the image scaled to 16 bits", file=sys.stderr)  # fmt: skip
    if white_is_zero:  # a TIFF stored WhiteIsZero (photometric 0): Pillow inverts only 8-bit ones
        values = 65535 - values
    return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over white, as transformers' processor (convert_to_rgb) and
    QoQ-Med's training data loader do: a plain convert drops the alpha, and a scan annotated on a
    transparent PNG came out black."""
    if "A" not in img.getbands() and img.info.get("transparency") is None:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
