"""Every coded concept the result objects use, in one place.

Standard concepts come from ``pydicom.sr.codedict.codes`` (generated from DICOM PS3.16)
wherever pydicom has them; the rest are written out here with the source they were
checked against. Concepts that have no standard code (or whose SNOMED CT code could not be
verified when this was written) use the project's private coding scheme ``99ICH``, which
the SR declares in its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.4).

Sources for the SNOMED CT subtype codes (checked 2026, offline, so re-check before a
clinical release):

* ``1386000`` Intracranial hemorrhage (disorder): pydicom's PS3.16 concept dictionary
  (``codes.SCT.IntracranialHemorrhage``).
* ``21454007`` Subarachnoid intracranial hemorrhage (disorder): a ValueSet expansion made by
  tx.fhir.org against SNOMED CT International 2025-02 (tecnomod-um/SK-FHIR-IG).
* ``35486000`` Subdural intracranial hemorrhage (disorder): the MR-RATE SNOMED CT mapping of
  brain findings (forithmus/MR-RATE ``pathologies_snomed_map.json``).
* ``274100004`` Cerebral hemorrhage (disorder): OHDSI Legend concept sets, the OpenSAFELY /
  PRIMIS neurological code lists and the tx.fhir.org expansion above; used for the RSNA
  "intraparenchymal" label.
* Epidural (extradural) and intraventricular hemorrhage: no source available offline gave a
  SNOMED CT code that could be confirmed (one stroke registry lists ``274110009`` for
  intraventricular hemorrhage; the often-quoted ``230706003`` is *Hemorrhagic cerebral
  infarction*, not intraventricular hemorrhage). They use ``99ICH`` codes until verified.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --------------------------------------------------------------------------- scheme

PRIVATE_SCHEME = "99ICH"
PRIVATE_SCHEME_NAME = "ICH triage node private codes"
PRIVATE_SCHEME_RESPONSIBLE = "ich-node project"

# --------------------------------------------------------------------------- findings

INTRACRANIAL_HEMORRHAGE: Code = codes.SCT.IntracranialHemorrhage  # SCT 1386000
SUBARACHNOID_HEMORRHAGE = Code("21454007", "SCT", "Subarachnoid intracranial hemorrhage")
SUBDURAL_HEMORRHAGE = Code("35486000", "SCT", "Subdural intracranial hemorrhage")
CEREBRAL_HEMORRHAGE = Code("274100004", "SCT", "Cerebral hemorrhage")
EPIDURAL_HEMORRHAGE = Code("EDH", PRIVATE_SCHEME, "Epidural hemorrhage")
INTRAVENTRICULAR_HEMORRHAGE = Code("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage")

# RSNA 2019 label -> finding concept (pipeline.findings.LABELS order).
LABEL_CODES: dict[str, Code] = {
    "any": INTRACRANIAL_HEMORRHAGE,
    "epidural": EPIDURAL_HEMORRHAGE,
    "intraparenchymal": CEREBRAL_HEMORRHAGE,
    "intraventricular": INTRAVENTRICULAR_HEMORRHAGE,
    "subarachnoid": SUBARACHNOID_HEMORRHAGE,
    "subdural": SUBDURAL_HEMORRHAGE,
}

# Human-readable subtype names for labels, banners and segment labels.
SUBTYPE_LABELS: dict[str, str] = {
    "epidural": "Epidural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hemorrhage",
}

# --------------------------------------------------------------------------- SEG

# CID 7150 Segmentation Property Categories.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Code = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
# CID 4 / anatomic region of every segment.
INTRACRANIAL_STRUCTURE: Code = codes.SCT.IntracranialStructure  # 128319008
# CID 7162 Algorithm Family.
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence  # DCM 123110

# --------------------------------------------------------------------------- SR

CT_OF_HEAD: Code = codes.SCT.ComputedTomographyOfHead  # SCT 303653007, CID 100-style
DEVICE: Code = codes.DCM.Device  # CID 270 Observer Type
PRESENT: Code = codes.SCT.Present  # SCT 52101004, CID 241 Present-Absent Only
# CID 241 as pydicom generates it: SCT 272519000 (SNOMED-RT R-4089B). Some finding models
# (e.g. the ACR/RSNA Open Imaging Finding Models) use 2667000 "Absent (qualifier value)".
ABSENT: Code = codes.SCT.Absent
PROBABILITY: Code = codes.DCM.Probability  # DCM 122157
VOLUME: Code = codes.SCT.Volume  # SCT 118565006
CENTER: Code = codes.DCM.Center  # DCM 111010, CID 219 Geometry Graphical Representation
PRIORITY: Code = codes.SCT.Priority  # SCT 260870009
URGENT: Code = codes.SCT.Urgency  # SCT 103391001
ROUTINE: Code = codes.SCT.Routine  # SCT 373115008
IMPRESSION: Code = codes.DCM.Impression  # DCM 121073
# TID 1500 row "Qualitative Evaluations" container (PS3.16 TID 1500).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Units (UCUM).
UNIT_PROBABILITY: Code = codes.UCUM.NoUnits  # "1"
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM: Code = codes.UCUM.Millimeter

# --------------------------------------------------------------------------- private

EXTENT_LEFT_RIGHT = Code("EXT-X", PRIVATE_SCHEME, "Extent along patient left-right axis")
EXTENT_ANTERIOR_POSTERIOR = Code("EXT-Y", PRIVATE_SCHEME,
                                 "Extent along patient anterior-posterior axis")
EXTENT_HEAD_FOOT = Code("EXT-Z", PRIVATE_SCHEME, "Extent along patient head-foot axis")
INTENDED_USE = Code("USE", PRIVATE_SCHEME, "Intended use statement")
DEMO_MODEL = Code("DEMO", PRIVATE_SCHEME, "Demonstration model warning")
RECONSTRUCTION_NOTE = Code("RECON", PRIVATE_SCHEME, "Volume reconstruction note")
ANALYSIS_NOTE = Code("NOTE", PRIVATE_SCHEME, "Analysis note")
WEIGHTS_SHA256 = Code("SHA256", PRIVATE_SCHEME, "Model weights SHA-256")
