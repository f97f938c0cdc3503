"""QoQ-Med's clinical domains (one table, so ids and display names are spelled in one place) and
the built-in set's split names: what the CLI offers as choices, without loading the set."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    id: str
    display: str  # how the answer choices and tables name it
    noun: str  # what "Above is ... of a patient." calls one image of it
    builtin: bool  # True when the bundled pydicom / pydicom-data files give real examples


# All nine domains QoQ-Med was trained on. User JSONL sets may use any of them; the built-in set
# covers only those that real files shipped on PyPI contain (no dermoscopy, fundus, pathology or
# mammography file exists in pydicom or pydicom-data, and we do not fake them).
DOMAINS: dict[str, Domain] = {
    d.id: d
    for d in (
        Domain("ct", "CT", "a CT image", True),
        Domain("mri", "MRI", "an MRI image", True),
        Domain("ultrasound", "Ultrasound", "an ultrasound image", True),
        Domain("xray", "X-ray", "an X-ray image", True),
        Domain("ecg", "ECG", "an ECG", True),
        Domain("mammography", "Mammography", "a mammography image", False),
        Domain("dermoscopy", "Dermoscopy", "a dermoscopy image", False),
        Domain("fundus", "Fundus", "a fundus image", False),
        Domain("pathology", "Pathology", "a pathology image", False),
    )
}

BUILTIN_DOMAINS: tuple[str, ...] = tuple(d.id for d in DOMAINS.values() if d.builtin)

SPLITS = ("train", "calib", "eval")
