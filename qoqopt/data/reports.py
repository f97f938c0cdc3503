"""Short clinical report sentences, written for qoqopt, to teach the mini model clinical English.

They cover the built-in domains and a few of QoQ-Med's others, in the plain register of real
reports (findings, then impression). Nothing here describes a particular patient.
"""

from __future__ import annotations

_REPORTS = (
    # chest X-ray
    "No acute cardiopulmonary abnormality. Heart size is normal.",
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Multiple rounded opacities in both lungs, suspicious for metastases.",
    "Mild cardiomegaly with pulmonary vascular congestion.",
    "Right lower lobe consolidation, consistent with pneumonia.",
    "The costophrenic angles are sharp. The mediastinum is not widened.",
    "Endotracheal tube tip lies 4 cm above the carina.",
    # extremity X-ray
    "Well-defined lucent lesion with a sclerotic rim in the distal tibia, typical of a non-ossifying fibroma.",
    "No fracture or dislocation. Joint spaces are preserved.",
    "Soft tissue swelling without underlying bony abnormality.",
    # CT
    "No intracranial haemorrhage, mass effect or midline shift.",
    "Large hypodense area in the left hemisphere in keeping with an established infarct.",
    "The paranasal sinuses and mastoid air cells are clear.",
    "The liver, spleen, pancreas and kidneys are unremarkable.",
    "No free fluid or free air in the abdomen.",
    "Pancreatic duct is not dilated. No peripancreatic collection.",
    "Degenerative changes of the thoracic spine without fracture.",
    "Pulmonary nodule of 6 mm in the right upper lobe; follow-up CT is advised.",
    # MRI
    "Full-thickness tear of the supraspinatus tendon with mild retraction.",
    "The rotator cuff tendons are intact. No joint effusion.",
    "Focal liver lesion with arterial enhancement and washout, suspicious for hepatocellular carcinoma.",
    "No abnormal signal in the brain parenchyma. The ventricles are normal in size.",
    "The corpus callosum is normal in thickness and signal.",
    "Small T2 hyperintense foci in the periventricular white matter.",
    # ultrasound
    "Oval lymph node with a preserved fatty hilum and hilar vascularity, likely reactive.",
    "Normal left ventricular size and systolic function. No pericardial effusion.",
    "Colour Doppler shows laminar flow without regurgitation.",
    "The urinary bladder is well distended with a smooth wall.",
    "Single live intrauterine pregnancy with normal fetal heart activity.",
    "The gallbladder contains several mobile echogenic stones with acoustic shadowing.",
    "No free fluid in the pelvis.",
    # ECG
    "Sinus rhythm at 61 beats per minute. Normal ECG.",
    "Normal PR interval, QRS duration and QT interval.",
    "The QRS axis is normal at 52 degrees.",
    "Atrial fibrillation with a controlled ventricular rate.",
    "ST elevation in leads II, III and aVF, consistent with an acute inferior infarct.",
    "Left bundle branch block. Compare with previous tracings.",
    "Sinus bradycardia without conduction abnormality.",
    # mammography, dermoscopy, fundus, pathology
    "Scattered fibroglandular densities. No suspicious mass or calcification. BI-RADS 1.",
    "Symmetric pigment network without atypical structures, consistent with a benign naevus.",
    "The optic disc and macula are normal. No diabetic retinopathy.",
    "Sections show invasive ductal carcinoma, grade 2, with clear margins.",
    # impressions and recommendations
    "Impression: no acute findings.",
    "Impression: findings are unchanged from the prior study.",
    "Clinical correlation is recommended.",
)


def report_texts() -> list[str]:
    """About 45 one- or two-sentence report snippets (a fresh list; callers may shuffle it)."""
    return list(_REPORTS)
