"""The DIMSE fast path's bytes: command sets, PDUs, Part 10 offsets and C-FIND identifiers
checked against what pydicom and pynetdicom make of the same thing."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_ECHO_RSP, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from archive import query
from archive.dimse import find, wire

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def pynetdicom_command(primitive, message_class) -> bytes:
    message = message_class()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize(
    "originator",
    [{}, {"originator_aet": "WORKSTATION1", "originator_message_id": 7}, {"originator_aet": "ODD", "originator_message_id": 65535}],
)
def test_it_encodes_a_c_store_request_as_pynetdicom_does(originator) -> None:
    primitive = C_STORE()
    primitive.MessageID = 513
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.3.45"  # odd length: padded with NUL
    primitive.Priority = 0
    primitive.MoveOriginatorApplicationEntityTitle = originator.get("originator_aet")
    primitive.MoveOriginatorMessageID = originator.get("originator_message_id")
    primitive.DataSet = io.BytesIO(b"\x00\x00")
    ours = wire.c_store_rq(CTImageStorage, "1.2.3.45", 513, **originator)
    assert ours == pynetdicom_command(primitive, C_STORE_RQ)
    parsed = wire.parse_command(ours)
    assert parsed["MessageID"] == 513 and parsed["AffectedSOPInstanceUID"] == "1.2.3.45"
    assert parsed.get("MoveOriginatorApplicationEntityTitle") == originator.get("originator_aet")


@pytest.mark.parametrize("code, comment", [(0xFF00, None), (0x0000, None), (0xA900, "query level X is not one")])
def test_it_encodes_a_c_find_response_as_pynetdicom_does(code, comment) -> None:
    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = STUDY_ROOT_FIND
    primitive.Status = code
    if comment:
        primitive.ErrorComment = comment
    if code == 0xFF00:
        primitive.Identifier = io.BytesIO(b"\x00\x00")
    ours = wire.c_find_rsp(STUDY_ROOT_FIND, 9, code, identifier=code == 0xFF00, comment=comment)
    assert ours == pynetdicom_command(primitive, C_FIND_RSP)
    assert wire.parse_command(ours)["Status"] == code


@pytest.mark.parametrize(
    "code, comment, instance",
    [(0x0000, None, "1.2.3.45"), (0xA700, "storage is full", "1.2.3.4"), (0xC000, "odd", None)],
)
def test_it_encodes_a_c_store_response_as_pynetdicom_does(code, comment, instance) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 77
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = instance
    primitive.Status = code
    if comment:
        primitive.ErrorComment = comment
    ours = wire.c_store_rsp(CTImageStorage, instance, 77, code, comment=comment)
    assert ours == pynetdicom_command(primitive, C_STORE_RSP)
    parsed = wire.parse_command(ours)
    assert (parsed["Status"], parsed["CommandField"], parsed.get("ErrorComment")) == (code, wire.C_STORE_RSP, comment)


@pytest.mark.parametrize("code, comment", [(0x0000, None), (0x0122, "no such SOP class")])
def test_it_encodes_a_c_echo_response_as_pynetdicom_does(code, comment) -> None:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    primitive.Status = code
    primitive.ErrorComment = comment
    ours = wire.c_echo_rsp("1.2.840.10008.1.1", 3, code, comment=comment)
    assert ours == pynetdicom_command(primitive, C_ECHO_RSP)


def test_it_refuses_bytes_that_are_no_command_set() -> None:
    with pytest.raises(wire.WireError):
        wire.parse_command(b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100")
    with pytest.raises(wire.WireError):
        wire.parse_command(wire.c_store_rq(CTImageStorage, "1.2.3", 1)[:-3])


@pytest.mark.parametrize("maximum, size", [(16384, 256000), (100, 256000), (0, 256000), (16384, 300), (0, 300)])
def test_pdus_respect_the_peer_maximum_and_pynetdicom_reads_them(maximum, size) -> None:
    command = wire.c_store_rq(CTImageStorage, "1.2.3.4", 1)
    dataset = (bytes(range(256)) * 1000)[:size]
    buffers = wire.pdus(3, command, dataset, maximum)
    if size == 300:  # a small message travels whole in one PDU
        assert len(buffers) == 2
    pdus = [buffers[i] + bytes(buffers[i + 1]) for i in range(0, len(buffers), 2)]
    limit = maximum or wire.UNLIMITED_PDU
    assert all(len(pdu) - 6 <= limit for pdu in pdus)
    command_part, data_part, flags = b"", b"", []
    for raw in pdus:
        pdu = P_DATA_TF()
        pdu.decode(raw)
        for context_id, value in pdu.to_primitive().presentation_data_value_list:
            assert context_id == 3
            flags.append(value[0])
            if value[0] & 1:
                command_part += value[1:]
            else:
                data_part += value[1:]
    assert command_part == command and data_part == dataset
    # The last fragment of each part, and only it, says so (PS3.8 E.2).
    assert [f for f in flags if f & 1] [-1] == 0x03 and flags.count(0x03) == 1 and flags.count(0x02) == 1
    assert flags[-1] == 0x02
    assert [(c, h, bytes(v)) for raw in pdus for c, h, v in wire.iter_pdvs(raw[6:])][0][:2] == (3, flags[0])


def test_pynetdicom_decodes_a_message_sent_whole_in_one_pdu() -> None:
    command = wire.c_find_rsp(STUDY_ROOT_FIND, 5, 0xFF00, identifier=True)
    identifier = b"\x10\x00\x20\x00LO\x04\x00PAT1"  # PatientID, Explicit VR Little Endian
    (head, value) = wire.pdus(1, command, identifier, 16384)
    pdu = P_DATA_TF()
    pdu.decode(head + value)
    message = C_FIND_RSP()
    assert message.decode_msg(pdu.to_primitive())
    assert message.command_set.Status == 0xFF00 and message.command_set.MessageIDBeingRespondedTo == 5
    assert message.data_set.getvalue() == identifier


@pytest.mark.parametrize(
    "sop_instance, syntax",
    [("1.2.3.4", "1.2.840.10008.1.2.1"), ("1.2.3.45", "1.2.840.10008.1.2"), ("1.2.826.0.1.3680043.10.999.1", "1.2.840.10008.1.2.4.50")],
)
def test_the_received_files_meta_is_what_pydicom_writes(sop_instance, syntax) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    import pynetdicom

    theirs = io.BytesIO()
    write_file_meta_info(
        theirs, create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    )
    ours = wire.file_meta(
        CTImageStorage,
        sop_instance,
        syntax,
        str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID),
        pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    assert ours == theirs.getvalue()


@pytest.mark.parametrize("size", [300, 40000])
def test_a_received_p_data_tf_gives_the_primitive_pynetdicom_gives(size) -> None:
    from archive.dimse import fastpath

    command = wire.c_store_rq(CTImageStorage, "1.2.3.4", 1)
    buffers = wire.pdus(5, command, bytes(range(256)) * (size // 256), 16384)
    for i in range(0, len(buffers), 2):
        raw = bytearray(buffers[i] + bytes(buffers[i + 1]))
        theirs = P_DATA_TF()
        theirs.decode(bytes(raw))
        ours = fastpath._ReceivedPData.of(raw)
        assert ours.to_primitive().presentation_data_value_list == theirs.to_primitive().presentation_data_value_list
    cut = bytearray(buffers[0] + bytes(buffers[1]))
    cut[6:10] = (10**6).to_bytes(4, "big")  # a PDV longer than its PDU: left to pynetdicom
    assert fastpath._ReceivedPData.of(cut) is None


def test_the_data_set_starts_after_the_file_meta(tmp_path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = "ODD_LENGTH"  # an OB-free, short-VR element
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    offset = wire.dataset_offset(data)
    assert decode(io.BytesIO(data[offset:]), False, True).PatientName == "Doe^Jane"
    with pytest.raises(wire.WireError):
        wire.dataset_offset(b"\x00" * 200)
    with pytest.raises(wire.WireError):
        wire.dataset_offset(data[:140])


ANSWERS = [
    {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": "1.2.9.1",
        "PatientName": "Doe^Jane",
        "PatientID": "P1",
        "StudyDate": "20240131",
        "StudyTime": "",
        "ModalitiesInStudy": ["CT", "MR"],
        "NumberOfStudyRelatedInstances": 12,
        "NumberOfStudyRelatedSeries": 3,
        "RetrieveAETitle": "PACSPORTAL",
    },
    {
        "QueryRetrieveLevel": "PATIENT",
        "PatientName": "Müller^Jürgen",
        "PatientID": "P2",
        "PatientBirthDate": "",
        "SpecificCharacterSet": "ISO_IR 192",
        "NumberOfPatientRelatedStudies": 1,
    },
    {
        "QueryRetrieveLevel": "IMAGE",
        "SOPInstanceUID": "1.2.9.1.1.1",
        "SOPClassUID": CTImageStorage,
        "InstanceNumber": 7,
        "Rows": 512,
        "Columns": [512],
        "PatientName": "山田^太郎=やまだ^たろう",
        "SpecificCharacterSet": "ISO_IR 192",
    },
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("explicit", [True, False])
def test_answers_encode_to_the_bytes_pydicom_writes(answer, explicit) -> None:
    ours = find.encode_answer(dict(answer), explicit_vr=explicit)
    assert ours is not None
    assert ours == encode(query.answer_dataset(answer), not explicit, True)
    back = decode(io.BytesIO(ours), not explicit, True)
    assert str(back.PatientName) == answer["PatientName"] if "PatientName" in answer else True


def test_answers_with_the_same_keys_share_a_layout_and_still_encode_their_own_values() -> None:
    """The elements' order and headers are worked out once per set of keys: the answers
    after the first must still give exactly pydicom's bytes for their own values (odd and
    even lengths, empty values, numbers, lists, a character set appended)."""
    first = dict(ANSWERS[0])
    variants = [
        first,
        first | {"PatientName": "Roe^Johnathan", "StudyTime": "101500", "NumberOfStudyRelatedSeries": 10},
        first | {"PatientID": "", "ModalitiesInStudy": ["CT"], "NumberOfStudyRelatedInstances": 1234567},
        first | {"ModalitiesInStudy": [], "StudyInstanceUID": "1.2.9.10"},
        first | {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 192"},
    ]
    for explicit in (True, False):
        for answer in variants:
            assert find.encode_answer(dict(answer), explicit_vr=explicit) == encode(
                query.answer_dataset(answer), not explicit, True
            ), answer
    too_long = first | {"PatientID": "x" * 0x10000}  # LO: a 2-byte length in Explicit VR
    assert find.encode_answer(too_long, explicit_vr=True) is None


@pytest.mark.parametrize(
    "answer",
    [
        {"QueryRetrieveLevel": "IMAGE", "SliceLocation": 1.5},  # a float: pydicom formats DS
        {"QueryRetrieveLevel": "STUDY", "PatientName": "Müller", "SpecificCharacterSet": "ISO_IR 100"},
        {"QueryRetrieveLevel": "STUDY", "PatientName": "Müller"},  # not ASCII and no character set
        {"QueryRetrieveLevel": "STUDY", "NoSuchKeyword": "x"},
    ],
)
def test_answers_it_cannot_encode_are_left_to_pydicom(answer) -> None:
    assert find.encode_answer(answer, explicit_vr=True) is None


def test_a_part10_file_from_pydicom_round_trips_through_the_offset() -> None:
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    with open(path, "rb") as handle:
        data = handle.read()
    offset = wire.dataset_offset(data)
    original = pydicom.dcmread(path)
    assert decode(io.BytesIO(data[offset:]), False, True).SOPInstanceUID == original.SOPInstanceUID


def _identifier(charset: str | None = None, **values) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


IDENTIFIERS = [
    _identifier(QueryRetrieveLevel="STUDY", PatientName="", StudyInstanceUID="", NumberOfStudyRelatedInstances=None),
    _identifier(QueryRetrieveLevel="study ", PatientName="SMITH*", StudyDate="20240101-20240131", StudyTime="-1200"),
    _identifier("ISO_IR 192", QueryRetrieveLevel="STUDY", PatientName="Müller^Jürgen", StudyDescription="Thorax  "),
    _identifier("ISO_IR 192", QueryRetrieveLevel="PATIENT", PatientName="山田*", PatientID="P?1"),
    _identifier("ISO_IR 100", QueryRetrieveLevel="STUDY", PatientName="Øster*", AccessionNumber="A 1"),
    _identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.3\\1.2.4", Modality=["CT", "MR"], SeriesNumber=None),
    _identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID="1.2.3.4", RetrieveAETitle=" PACS ", Rows=None),
    _identifier(QueryRetrieveLevel="STUDY", StudyComments="free text\\with a backslash  ", ModalitiesInStudy="CT\\MR"),
    _identifier(QueryRetrieveLevel="STUDY", InstitutionName="Hospital ", PatientName="Doe^Jane^^^"),
]


@pytest.mark.parametrize("identifier", IDENTIFIERS)
@pytest.mark.parametrize("explicit", [True, False])
def test_identifiers_read_from_their_bytes_as_pydicom_reads_them(identifier, explicit) -> None:
    data = encode(identifier, not explicit, True)
    fast = find.fast_identifier_keys(data, explicit_vr=explicit)
    assert fast is not None
    assert fast == find.identifier_keys(decode(io.BytesIO(data), not explicit, True))


@pytest.mark.parametrize(
    "identifier",
    [
        _identifier("ISO 2022 IR 100", QueryRetrieveLevel="STUDY", PatientName="Müller"),  # another character set
        _identifier("ISO_IR 192", QueryRetrieveLevel="STUDY", PatientName="Yamada^Tarou=山田^太郎"),  # component groups
        _identifier(QueryRetrieveLevel="STUDY", NumberOfStudyRelatedInstances="007"),  # a number pydicom formats
        _identifier(QueryRetrieveLevel="IMAGE", Rows=512),  # a binary value
        _identifier(QueryRetrieveLevel="STUDY", ReferencedStudySequence=[Dataset()]),  # a sequence
    ],
)
def test_identifiers_it_does_not_read_are_left_to_pydicom(identifier) -> None:
    assert find.fast_identifier_keys(encode(identifier, False, True), explicit_vr=True) is None


def test_an_identifier_cut_short_is_left_to_pydicom() -> None:
    data = encode(_identifier(QueryRetrieveLevel="STUDY", PatientName="SMITH*"), False, True)
    assert find.fast_identifier_keys(data[:-3], explicit_vr=True) is None
    assert find.fast_identifier_keys(data + b"\x10\x00", explicit_vr=True) is None
