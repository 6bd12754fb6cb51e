"""File Meta Information (PS3.10 7.1) encoded without building a pydicom Dataset.

The C-STORE handler writes the received data set behind a preamble and this group;
pydicom's writer costs about a millisecond per instance on the association thread,
this costs microseconds. ``tests/node/test_filemeta.py`` checks that the bytes equal
pydicom's encoding of the same elements.
"""

from __future__ import annotations

import struct

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                     implementation_uid: str, implementation_version: str,
                     source_ae_title: str | None = None) -> bytes:
    """The File Meta Information group, group length included."""
    body = b"".join([
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _uid(sop_class_uid)),
        _element(0x00020003, b"UI", _uid(sop_instance_uid)),
        _element(0x00020010, b"UI", _uid(transfer_syntax)),
        _element(0x00020012, b"UI", _uid(implementation_uid)),
        _element(0x00020013, b"SH", _text(implementation_version)),
        *([_element(0x00020016, b"AE", _text(source_ae_title))] if source_ae_title else []),
    ])
    return _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body
