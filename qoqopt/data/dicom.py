"""DICOM pixels to 8-bit RGB, the way a viewer would display them.

Order matters and follows DICOM PS3.3 C.11: stored values -> Modality LUT (rescale slope and
intercept, giving e.g. Hounsfield units) -> VOI LUT or window centre/width -> presentation
(MONOCHROME1 is inverted: its 0 is white). Colour data goes to RGB first: palette colour through
its LUT, YBR through pydicom's colour conversion. Everything lands in [0, 255] uint8.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import ExplicitVRLittleEndian

from qoqopt.errors import QoqoptError

# (centre, width) in Hounsfield units: the common radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Brain": (40.0, 80.0),
    "Soft tissue": (40.0, 400.0),
    "Lung": (-600.0, 1500.0),
    "Bone": (300.0, 2000.0),
}


# Decoders tried first, where they read the transfer syntax: the ones the built-in set was drawn
# with. gdcm (a dependency, for JPEG Lossless and JPEG-LS, which nothing else here reads) would
# otherwise take over JPEG baseline and JPEG 2000 and change their pixels slightly.
_PREFERRED_DECODERS = ("pydicom", "pillow")

# Enhanced multi-frame objects (PS3.3 C.7.6.16) keep what a single-frame file has at its top level
# in functional groups, shared by all frames or given per frame: (group macro, its attributes).
_FRAME_MACROS = (
    ("PixelValueTransformationSequence", ("RescaleIntercept", "RescaleSlope", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
)


def read_dicom(src: str | Path | Dataset, stop_before_pixels: bool = False) -> Dataset:
    """A parsed dataset; a path that is not DICOM becomes a QoqoptError naming the file."""
    if isinstance(src, Dataset):
        return src
    try:
        try:
            return pydicom.dcmread(str(src), stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError:
            ds = _without_preamble(src, stop_before_pixels)
            if ds is None:
                raise QoqoptError(f"{src}: not a DICOM file (no DICM marker after the 128-byte preamble)") from None
            return ds
    except (OSError, ValueError, AttributeError) as exc:
        raise QoqoptError(f"{src}: not a readable DICOM file ({exc})") from exc


def _without_preamble(src: str | Path, stop_before_pixels: bool) -> Dataset | None:
    """A dataset stored without the Part 10 preamble and file meta (older PACS exports, ACR-NEMA
    style): read when it starts with a group 0008 element and holds an image or a waveform, which
    pydicom's forced read of any other file would not."""
    with open(src, "rb") as f:
        if f.read(2) != b"\x08\x00":
            return None
    ds = pydicom.dcmread(str(src), stop_before_pixels=stop_before_pixels, force=True)
    return ds if "Rows" in ds or "WaveformSequence" in ds else None


def frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise QoqoptError(f"{_name(ds)}: Number of Frames is {ds['NumberOfFrames'].value!r}, not a count") from None


def frame_view(ds: Dataset, index: int) -> Dataset:
    """A dataset holding ``ds``'s top level plus frame ``index``'s functional groups (shared, then
    that frame's own, which win), where rescale, windowing and orientation are read; ``ds`` itself
    when it has none. ``ds`` is left as it was."""
    shared, per_frame = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) != frame_count(ds):
        raise QoqoptError(f"{_name(ds)}: {len(per_frame)} per-frame functional groups for {frame_count(ds)} frames")
    groups = ([shared[0]] if shared else []) + ([per_frame[index]] if per_frame else [])
    if not groups:
        return ds
    view = _view_of(ds)  # elements added below replace entries in its own table only
    for group in groups:
        for macro, keywords in _FRAME_MACROS:
            for item in group.get(macro) or []:
                for keyword in keywords:
                    if keyword in item:
                        view.add(copy.deepcopy(item[keyword]))
    return view


def decode_frame(ds: Dataset, frame: int | None = None) -> tuple[np.ndarray, str]:
    """Stored values of one frame and the photometric interpretation they are actually in.

    ``raw=True`` keeps YBR data as YBR so the colour conversion below is explicit; the decoder's
    metadata says what it returned (a JPEG decoder may already have produced RGB).
    """
    if "PixelData" not in ds:
        raise QoqoptError(f"{_name(ds)}: DICOM has no pixel data (Modality {ds.get('Modality', '?')})")
    index = frame_index(ds, frame)
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian) if file_meta else ExplicitVRLittleEndian
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise QoqoptError(f"{_name(ds)}: cannot decode pixel data ({exc})") from None
    if not decoder.is_available:
        needs = " ".join("; ".join(decoder.missing_dependencies).split())  # pydicom's own advice, on one line
        raise QoqoptError(f"{_name(ds)}: no decoder for {syntax.name} is installed ({needs})")
    preferred = [name for name in _PREFERRED_DECODERS if name in decoder.available_plugins]
    for plugin in preferred[:1] + [""]:  # "": every available plugin, in pydicom's order
        try:
            arr, meta = decoder.as_array(ds, index=index, raw=True, decoding_plugin=plugin)
            return arr, str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
        except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as exc:
            error = exc  # e.g. Pillow and 12-bit JPEG: the others get their turn
    # one line: pydicom's message lists the plugins over several
    raise QoqoptError(f"{_name(ds)}: cannot decode pixel data ({' '.join(str(error).split())})") from None


def frame_index(ds: Dataset, frame: int | None) -> int:
    """``frame``, or the middle frame of a clip or stack (the most typical one) when it is None."""
    n = frame_count(ds)
    index = n // 2 if frame is None else frame
    if not 0 <= index < n:
        raise QoqoptError(f"{_name(ds)}: frame {index} out of range (it has {n})")
    return index


def dicom_to_array(
    src: str | Path | Dataset,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    reorient: bool = True,
) -> np.ndarray:
    """One frame as uint8 RGB (rows, columns, 3). `window` (centre, width) overrides the file's VOI;
    `reorient` flips slices stored mirrored into the usual radiological display (see below)."""
    ds = read_dicom(src)
    index = frame_index(ds, frame)
    arr, pi = decode_frame(ds, index)
    ds = frame_view(ds, index)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        rgb = np.repeat(_to_uint8(grey_to_unit(arr, ds, window))[..., None], 3, axis=-1)
    elif window is not None:
        raise QoqoptError(f"{_name(ds)}: a window applies to greyscale images only, this one is {pi}")
    else:
        rgb = colour_to_rgb8(arr, ds, pi)
    return display_orientation(rgb, ds) if reorient else rgb


def dicom_to_image(
    src: str | Path | Dataset,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    reorient: bool = True,
) -> Image.Image:
    """One frame (default: the middle one) as a PIL RGB image."""
    return Image.fromarray(dicom_to_array(src, frame, window, reorient), "RGB")


def display_orientation(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    """Flip a slice so it reads the way radiologists (and image-trained models) expect.

    The convention: patient's left on the viewer's right (rows run toward +x in DICOM's LPS
    patient axes), posterior or feet at the bottom (columns run toward +y, or -z in coronal and
    sagittal slices). Some scanners store slices mirrored, e.g. columns toward anterior, which
    shows an abdomen upside down. Only flips are done, and only for near axis-aligned planes:
    anything else is left as stored.
    """
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return rgb
    wanted = {0: 1.0, 1: 1.0, 2: -1.0}  # the sign each patient axis should have, by axis index
    flips = []
    for direction, image_axis in ((np.array(iop[:3], float), 1), (np.array(iop[3:], float), 0)):
        axis = int(np.argmax(np.abs(direction)))
        if abs(direction[axis]) < 0.8:  # too oblique (over ~37 degrees): no honest flip exists
            return rgb
        if np.sign(direction[axis]) != wanted[axis]:
            flips.append(image_axis)
    if not flips:
        return rgb
    rgb = np.flip(rgb, axis=tuple(flips))
    return np.ascontiguousarray(rgb)


def grey_to_unit(arr: np.ndarray, ds: Dataset, window: tuple[float, float] | None = None) -> np.ndarray:
    """Greyscale stored values -> display values in [0, 1] (0 black, 1 white)."""
    ds = display_view(ds, own_window=window is None)
    values = apply_modality_lut(arr, ds)
    voi_ds = _window_dataset(ds, *window) if window else _own_voi(ds)
    if voi_ds is None and ds.get("Modality") == "CT":
        # Hounsfield units are absolute, so a fixed soft-tissue window is what a reader would open;
        # a percentile stretch would be dominated by air and the table.
        voi_ds = _window_dataset(ds, *WINDOW_PRESETS["Soft tissue"])
    if voi_ds is not None:
        if "VOILUTSequence" in voi_ds and np.issubdtype(values.dtype, np.floating):
            values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers
        with np.errstate(over="ignore"):  # a narrow SIGMOID's exp saturates, as it should
            shown = apply_voi_lut(values, voi_ds).astype(np.float64)
        lo, hi = _voi_range(voi_ds)
    elif _is_display_ready(ds):  # its stored range is the display range: 1-bit masks are 0 and 255
        shown, lo, hi = values.astype(np.float64), 0.0, 2.0 ** int(ds.BitsStored) - 1
    else:
        # No VOI in the file (e.g. enhanced MR keeps it per frame): stretch robustly, as viewers do,
        # over the scanned pixels (a padding value filling a third of the frame set the low end)
        shown = values.astype(np.float64)
        padding = _padding(arr, ds)
        scanned = shown if padding is None or padding.all() else shown[~padding]
        lo, hi = (float(v) for v in np.percentile(scanned, [0.5, 99.5]))
    # lo and hi are what the lowest and highest values show as: a negative rescale slope makes
    # pydicom's window output run downwards (hi < lo), and the picture is still the right way up
    span = hi - lo if abs(hi - lo) > 1e-12 else 1e-12
    unit = np.clip((shown - lo) / span, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        unit = 1.0 - unit  # MONOCHROME1: the minimum value is displayed white
    return unit


def _padding(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Where the stored values are Pixel Padding (PS3.3 C.7.5.1.1.2: a value, or a range up to Pixel
    Padding Range Limit, that marks pixels outside the scanned field); None without one."""
    value, limit = _first_int(ds, "PixelPaddingValue"), _first_int(ds, "PixelPaddingRangeLimit")
    if value is None:
        return None
    lo, hi = sorted((value, value if limit is None else limit))
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _first_int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute's (first) value; None when absent, empty or not a number."""
    try:
        value = _first(ds[keyword]) if keyword in ds else None
        return None if value in ("", None) else int(value)
    except (TypeError, ValueError):
        return None


def colour_to_rgb8(arr: np.ndarray, ds: Dataset, pi: str) -> np.ndarray:
    """Colour stored values in photometric interpretation `pi` -> uint8 RGB."""
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _to_uint8(rgb / (2.0 ** _palette_bits(ds) - 1))
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        # _422 data comes out of the decoder already upsampled, so both convert the same way.
        return convert_color_space(arr.astype(np.uint8), "YBR_FULL", "RGB")
    if pi == "RGB":
        if arr.dtype == np.uint8:
            return arr
        return _to_uint8(arr / (2.0 ** int(ds.BitsStored) - 1))
    raise QoqoptError(f"{_name(ds)}: unsupported photometric interpretation {pi}")


def _palette_bits(ds: Dataset) -> int:
    """Bits per palette entry. The descriptor says 8 or 16, but some older writers put 8-bit values
    in 16-bit entries (PS3.3 C.7.6.3.1.5 notes it): read as 16-bit, every colour is near black. A
    16-bit table whose entries all fit in 8 bits is taken as 8-bit, as DCMTK does."""
    n, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    if bits != 16:
        return bits
    table = apply_color_lut(np.arange(first, first + (n or 65536)), ds)  # every entry, segmented tables too
    return 8 if table.max() <= 255 else 16


# The greyscale display attributes: each is a number (or several, of which pydicom reads the first),
# read by apply_modality_lut and apply_voi_lut; an empty one is as good as absent.
_RESCALE = ("RescaleSlope", "RescaleIntercept")
_WINDOW = ("WindowCenter", "WindowWidth")


def display_view(ds: Dataset, own_window: bool = True) -> Dataset:
    """``ds`` as its display attributes are meant: an empty window is none (viewers treat it so),
    and of rescale slope and intercept one alone stands with the other's identity (pydicom applies
    neither without both, which showed a CT's raw values as if they were HU). Each other value used
    is checked: not a finite number, or a window narrower than pydicom's windowing takes (PS3.3
    C.11.2.1.2), is a one-line error naming the file, not pydicom's TypeError mid-export. The window
    is not used under an ``own_window=False`` override, nor where a VOI LUT Sequence takes precedence."""
    empty = [k for k in (*_RESCALE, *_WINDOW, "VOILUTFunction") if k in ds and _first(ds[k]) in ("", None)]
    if "VOILUTSequence" in ds and not _usable_lut(ds.VOILUTSequence):
        empty.append("VOILUTSequence")  # pydicom passes over it to the window, as viewers do
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        raise QoqoptError(f"{_name(ds)}: VOI LUT Function is {function!r}, none of the {', '.join(VOI_FUNCTIONS)} "
                          "DICOM defines")  # fmt: skip
    lut = "VOILUTSequence" in ds and "VOILUTSequence" not in empty
    used = _RESCALE + (_WINDOW if own_window and not lut else ())
    for keyword in used:
        if keyword in ds and keyword not in empty:
            _check_number(ds, keyword)
    changes: dict[str, float | None] = {k: None for k in empty}  # None: removed
    rescale = [k for k in _RESCALE if k in ds and k not in empty]
    if len(rescale) == 1:
        other = next(k for k in _RESCALE if k != rescale[0])
        changes[other] = _IDENTITY[other]
    if not changes:
        return ds
    view = _view_of(ds)
    for keyword, value in changes.items():
        if value is None:
            del view[keyword]
        else:
            setattr(view, keyword, value)
    return view


_IDENTITY = {"RescaleSlope": 1.0, "RescaleIntercept": 0.0}
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3


def _usable_lut(sequence) -> bool:
    """A VOI LUT Sequence whose first item (the one pydicom applies) has its descriptor and data."""
    return len(sequence) > 0 and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _view_of(ds: Dataset) -> Dataset:
    """A dataset with ``ds``'s elements in a table of its own (``ds`` keeps every element whatever
    the view gains or loses), its file name, and its encoding: pydicom reads OW LUT data (a VOI or
    modality LUT) by the file's transfer syntax, and without it raised AttributeError."""
    view = Dataset()
    view.update(ds)
    view.filename = getattr(ds, "filename", None)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        view.file_meta = meta
    implicit, little = ds.original_encoding
    view.set_original_encoding(implicit, little, ds.original_character_set)
    return view


def _first(element):
    """The value pydicom's rescale and windowing read: a multi-valued element's first."""
    value = element.value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _check_number(ds: Dataset, keyword: str) -> None:
    element = ds[keyword]
    try:
        number = float(_first(element))
    except (TypeError, ValueError):
        raise QoqoptError(f"{_name(ds)}: {element.name} is {element.value!r}, not a number") from None
    if not np.isfinite(number):
        raise QoqoptError(f"{_name(ds)}: {element.name} is {element.value!r}, not a finite number")
    linear = str(ds.get("VOILUTFunction", "") or "LINEAR").upper() == "LINEAR"
    if keyword == "WindowWidth" and (number < 1 if linear else number <= 0):  # pydicom's own rule
        raise QoqoptError(f"{_name(ds)}: {element.name} is {element.value!r}; a window "
                          + ("must be at least 1 wide" if linear else "must be wider than 0"))


def _own_voi(ds: Dataset) -> Dataset | None:
    """The dataset itself when it carries a VOI transform (LUT or window), else None."""
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    return ds if ("VOILUTSequence" in ds or has_window) else None


def _window_dataset(ds: Dataset, center: float, width: float) -> Dataset:
    """A minimal dataset holding `ds`'s modality output range plus the given window.

    apply_voi_lut reads the window from a dataset; building a small one keeps the caller's
    dataset untouched and drops any VOI LUT that would otherwise take precedence.
    """
    out = Dataset()
    out.PhotometricInterpretation = "MONOCHROME2"  # inversion is done once, by the caller
    for keyword in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"):
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    out.WindowCenter = float(center)
    out.WindowWidth = float(width)
    return out


def _voi_range(voi_ds: Dataset) -> tuple[float, float]:
    """The output range of the VOI transform, so its result maps exactly onto [0, 1]."""
    if "VOILUTSequence" in voi_ds:
        bits = int(voi_ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0**bits - 1
    # Windowing saturates to its output range, so pushing -inf and +inf through gives the range
    # (SIGMOID's exp overflows to that limit, which is the point: no warning for it).
    with np.errstate(over="ignore"):
        lo, hi = apply_voi_lut(np.array([-1e30, 1e30]), voi_ds)
    return float(lo), float(hi)


def _is_display_ready(ds: Dataset) -> bool:
    """8-bit unsigned data without rescale is already display grey levels (e.g. ultrasound); a Modality
    LUT maps them elsewhere (up to 16 bits: clipped at 255, nearly every pixel was white)."""
    no_rescale = float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
    no_lut = "ModalityLUTSequence" not in ds
    return int(ds.BitsStored) <= 8 and int(ds.PixelRepresentation) == 0 and no_rescale and no_lut


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _name(ds: Dataset) -> str:
    return str(getattr(ds, "filename", None) or "<in-memory DICOM>")
