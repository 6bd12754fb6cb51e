"""The DICOM node: receive, spool, assemble, queue, send."""
