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

from importlib import import_module

# Where each public name lives. They load on first use (PEP 562), so importing the package, as the
# CLI does to build its parser, does not import pydicom (0.3 s at every start).
_HOMES = {
    "augment": ("DEFAULT_MAX_SIDE", "MAX_PIXELS", "MIN_PIXELS", "fit_size"),
    "dicom": ("WINDOW_PRESETS", "dicom_to_array", "dicom_to_image"),
    "domains": ("BUILTIN_DOMAINS", "DOMAINS", "SPLITS", "Domain"),
    "ecg": ("ENCODER_LEADS", "STANDARD_LEADS", "EcgRecording", "ecg_signal", "read_ecg", "render_ecg"),
    "items": ("ClinicalItem", "balanced_sample", "clinical_set", "domain_counts", "find_item"),
    "jsonl": ("load_jsonl",),
    "prompts": ("QUESTION_TYPES", "THINK_SUFFIX"),
    "reports": ("report_texts",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME_OF[name]}"), name)


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
