"""QoQ-Med's prompt format: CLIMB-style questions, the think-then-box suffix, reference replies.

QoQ-Med was trained with user turns of the form ``{question} {format instruction}`` (see its
``medical_format.jinja``). Calibration statistics only mean something if the calibration prompts
look like that, so every built-in question goes through :func:`format_question`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qoqopt.data.domains import DOMAINS

# QoQ-Med's own instruction, shortened. We drop its middle sentence (outline objects of interest as
# a ```json``` list of "bbox_2d" boxes): our references are classification labels without box
# annotations, so a reference reply could not contain honest boxes, and the mini model that learns
# these replies would only learn to emit made-up coordinates. The think / \boxed{} contract, which
# the verifiers parse, is kept word for word.
THINK_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)


@dataclass(frozen=True)
class QuestionType:
    id: str
    ask: str  # the question sentence
    choices: tuple[str, ...]  # 3-6 answer options, in the order the prompt lists them
    domain_neutral: bool = False  # True: the preamble must not name the domain (it is the answer)


QUESTION_TYPES: dict[str, QuestionType] = {
    q.id: q
    for q in (
        QuestionType(
            "modality",
            "Which imaging modality or recording is shown?",
            ("CT", "MRI", "Ultrasound", "X-ray", "ECG"),
            domain_neutral=True,
        ),
        QuestionType("region_ct", "Which body region is shown?", ("Head", "Chest", "Abdomen", "Pelvis", "Spine")),
        QuestionType("region_mri", "Which body region is shown?", ("Head", "Shoulder", "Abdomen", "Knee", "Spine")),
        QuestionType("region_xray", "Which body region is shown?", ("Chest", "Skull", "Hand", "Leg", "Pelvis")),
        QuestionType(
            "region_ultrasound", "Which structure is examined?", ("Heart", "Pelvis", "Lymph node", "Liver", "Thyroid")
        ),
        QuestionType("window", "Which display window is used?", ("Brain", "Soft tissue", "Lung", "Bone")),
        QuestionType("plane", "In which anatomical plane is this slice?", ("Axial", "Coronal", "Sagittal")),
        QuestionType("mode", "Which ultrasound mode is shown?", ("B-mode", "Colour Doppler", "M-mode")),
        QuestionType("view", "Which radiographic projection is shown?", ("PA", "AP", "Lateral")),
        QuestionType(
            "rhythm",
            "What is the cardiac rhythm?",
            ("Sinus rhythm", "Atrial fibrillation", "Atrial flutter", "Ventricular tachycardia"),
        ),
        QuestionType("rate", "How is the heart rate classified?", ("Bradycardia", "Normal", "Tachycardia")),
    )
}


def format_question(domain: str, ask: str, choices: list[str] | tuple[str, ...], domain_neutral=False) -> str:
    """The full user text: CLIMB preamble, question, answer options, QoQ-Med's format instruction."""
    noun = "a medical image" if domain_neutral else DOMAINS[domain].noun
    # CLIMB says "one word" because its labels are single words; say "one option" when they are not.
    unit = "one word" if all(" " not in c for c in choices) else "one option"
    options = ", ".join(choices)
    return f"Above is {noun} of a patient. {ask} Answer with {unit} from the following: {options}. {THINK_SUFFIX}"


def with_suffix(question: str) -> str:
    """Append the format instruction to a user's own question unless it already asks for \\boxed{}."""
    question = question.strip()
    return question if "\\boxed" in question else f"{question} {THINK_SUFFIX}"


# One short, image-grounded sentence per (question type, answer): the mini model learns these as
# the <think> part, so they stay brief and say what in the pixels gives the answer away.
_REASONS: dict[tuple[str, str], str] = {
    ("modality", "CT"): "A cross-sectional slice with bright bone and dark air in Hounsfield grey levels.",
    ("modality", "MRI"): "A cross-sectional slice with soft-tissue contrast and no bright cortical bone.",
    ("modality", "Ultrasound"): "A speckled sonographic image with scanner annotations.",
    ("modality", "X-ray"): "A projection radiograph with overlapping bones and soft tissue.",
    ("modality", "ECG"): "Voltage traces of twelve leads on millimetre grid paper.",
    ("window", "Brain"): "A narrow window: grey and white matter separate and bone is saturated.",
    ("window", "Soft tissue"): "A medium window: soft tissues are mid-grey and fat is dark.",
    ("window", "Lung"): "A low, wide window: soft tissue is nearly white and only air is dark.",
    ("window", "Bone"): "A high, wide window: soft tissue is flat grey and bone detail shows.",
    ("mode", "Colour Doppler"): "Colour flow signal is overlaid on the grey-scale image.",
    ("mode", "B-mode"): "A grey-scale image without colour flow.",
    ("rhythm", "Sinus rhythm"): "Regular narrow QRS complexes, each preceded by an upright P wave in II.",
}


def reason_for(qtype: str, answer: str, meta: dict | None = None) -> str:
    """The short reasoning sentence of a reference reply."""
    meta = meta or {}
    if (qtype, answer) in _REASONS:
        return _REASONS[(qtype, answer)]
    family = qtype.split("_")[0]
    if family == "region":
        return f"The visible anatomy is of the {answer.lower()}."
    if family == "plane":
        return f"The slice is oriented in the {answer.lower()} plane."
    if family == "view":
        return f"The beam direction and anatomy match the {answer} projection."
    if family == "rate" and "heart_rate_bpm" in meta:
        return f"The RR interval gives about {meta['heart_rate_bpm']:.0f} beats per minute."
    return f"The image shows {answer}."


def target_text(answer: str, reason: str) -> str:
    """QoQ-Med's reply shape: reasoning in <think> tags, then the answer in \\boxed{}."""
    return f"<think>{reason}</think>\n\\boxed{{{answer}}}"
