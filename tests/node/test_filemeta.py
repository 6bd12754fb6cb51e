"""The hand-encoded File Meta Information equals pydicom's encoding."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from node.filemeta import encode_file_meta


@pytest.mark.parametrize("source_ae", [None, "CT_ER", "ODD"])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1." + "2" * 62])
def test_equals_pydicom(sop_uid: str, source_ae: str | None) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"
    meta.ImplementationVersionName = "PYNETDICOM_304"
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = BytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    assert encode_file_meta(meta.MediaStorageSOPClassUID, sop_uid, meta.TransferSyntaxUID,
                            meta.ImplementationClassUID, meta.ImplementationVersionName,
                            source_ae) == buffer.getvalue()
