"""DICOM results: TID 1500 SR, SEG and preview series (highdicom)."""
