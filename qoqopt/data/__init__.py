"""Clinical calibration and evaluation data for QoQ-Med, built from real files shipped on PyPI.

    from qoqopt.data import clinical_set, balanced_sample
    items = balanced_sample(clinical_set("calib", n_per_base=4), n=40, seed=0)
    chat = items[0].messages()          # for processor.apply_chat_template
    reply = items[0].target_text()      # "<think>...</think>\\n\\boxed{...}"

Modules, one job each: ``domains`` (the domain table), ``dicom`` (pixels to RGB), ``ecg``
(waveforms: raw signal and paper plot), ``augment`` (sizes and seeded views), ``catalog`` (the
labelled base files), ``prompts`` (QoQ-Med's question format), ``items`` (items, splits,
sampling), ``jsonl`` (user sets), ``reports`` (clinical sentences), ``cli`` (``qoqopt data``).
"""

from qoqopt.data.augment import DEFAULT_MAX_SIDE, MAX_PIXELS, MIN_PIXELS, fit_size
from qoqopt.data.dicom import WINDOW_PRESETS, dicom_to_array, dicom_to_image
from qoqopt.data.domains import BUILTIN_DOMAINS, DOMAINS, Domain
from qoqopt.data.ecg import ENCODER_LEADS, STANDARD_LEADS, EcgRecording, ecg_signal, read_ecg, render_ecg
from qoqopt.data.items import SPLITS, ClinicalItem, balanced_sample, clinical_set, domain_counts, find_item
from qoqopt.data.jsonl import load_jsonl
from qoqopt.data.prompts import QUESTION_TYPES, THINK_SUFFIX
from qoqopt.data.reports import report_texts

__all__ = [
    "BUILTIN_DOMAINS",
    "DEFAULT_MAX_SIDE",
    "DOMAINS",
    "ENCODER_LEADS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "QUESTION_TYPES",
    "SPLITS",
    "STANDARD_LEADS",
    "THINK_SUFFIX",
    "WINDOW_PRESETS",
    "ClinicalItem",
    "Domain",
    "EcgRecording",
    "balanced_sample",
    "clinical_set",
    "dicom_to_array",
    "dicom_to_image",
    "domain_counts",
    "ecg_signal",
    "find_item",
    "fit_size",
    "load_jsonl",
    "read_ecg",
    "render_ecg",
    "report_texts",
]
