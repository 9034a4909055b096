"""The DICOMweb door with a client nobody on the team wrote (dicomweb-client, PyPI) and
with the exact requests OHIF makes: STOW-RS with per-instance results, QIDO-RS on patient
identity, WADO-RS byte for byte, metadata, and frames native and in HTJ2K."""

from __future__ import annotations

import uuid
from io import BytesIO

import imagecodecs
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from tests.integration.conftest import ct_instances
from tests.integration.node import Node

HTJ2K = "1.2.840.10008.1.2.4.201"


class Study:
    """A study of a patient of its own: three CT images and a multi-frame one."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8].upper()
        self.patient_id = f"WEB-{tag}"
        self.family = f"WEBTEST{tag}"
        self.study_uid = generate_uid()
        self.series_uid = generate_uid()
        self.files: dict[str, bytes] = {}
        self.datasets: list[pydicom.Dataset] = []
        for number, (_, data) in enumerate(ct_instances(3, f"web-{tag}"), 1):
            self._add(pydicom.dcmread(BytesIO(data)), number)
        multi = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # 10 frames
        multi.add_new(0x60003000, "OW", bytes(range(256)) * 16)  # Overlay Data: bulk data
        self._add(multi, 4)

    def _add(self, dataset: pydicom.Dataset, number: int) -> None:
        dataset.PatientName = f"{self.family}^BRUNO"
        dataset.PatientID = self.patient_id
        dataset.PatientBirthDate = "19650423"
        dataset.StudyInstanceUID = self.study_uid
        dataset.SeriesInstanceUID = self.series_uid
        dataset.InstanceNumber = number
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.files[dataset.SOPInstanceUID] = buffer.getvalue()
        self.datasets.append(pydicom.dcmread(BytesIO(buffer.getvalue())))


@pytest.fixture(scope="module")
def client(node: Node) -> DICOMwebClient:
    return DICOMwebClient(node.http_url, headers={"Authorization": f"Bearer {node.http_token}"})


@pytest.fixture(scope="module")
def study(client: DICOMwebClient) -> Study:
    study = Study()
    answer = client.store_instances(study.datasets)
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == set(study.files)
    return study


def test_a_request_without_a_valid_token_is_refused(node: Node) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic x"}):
        answer = requests.get(f"{node.http_url}/studies", headers=headers, timeout=30)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_stow_reports_each_instance_and_stores_the_rest(client: DICOMwebClient) -> None:
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good.SOPInstanceUID = generate_uid()
    good.file_meta.MediaStorageSOPInstanceUID = good.SOPInstanceUID
    bad = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    bad.SOPInstanceUID = generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.PixelData = bad.PixelData[:-100]  # shorter than its rows and columns say
    statuses: list[int] = []
    client._session.hooks["response"].append(lambda r, *_, **__: statuses.append(r.status_code))
    try:
        answer = client.store_instances([good, bad])
    finally:
        client._session.hooks["response"].pop()
    assert statuses == [202]  # some stored, some not (PS3.18 10.5.3)
    [stored] = answer.ReferencedSOPSequence
    [failed] = answer.FailedSOPSequence
    assert stored.ReferencedSOPInstanceUID == good.SOPInstanceUID
    assert failed.ReferencedSOPInstanceUID == bad.SOPInstanceUID
    assert failed.FailureReason == 0xA900
    kept = client.retrieve_instance(
        good.StudyInstanceUID, good.SeriesInstanceUID, good.SOPInstanceUID
    )
    assert kept.SOPInstanceUID == good.SOPInstanceUID


def test_qido_finds_the_study_by_name_and_returns_identity(
    client: DICOMwebClient, study: Study
) -> None:
    found = client.search_for_studies(
        search_filters={"PatientName": f"{study.family.lower()}*"},
        fields=["PatientBirthDate"],
    )
    [match] = [pydicom.Dataset.from_json(item) for item in found]
    assert match.StudyInstanceUID == study.study_uid
    assert match.PatientID == study.patient_id
    assert str(match.PatientBirthDate) == "19650423"
    assert int(match.NumberOfStudyRelatedInstances) == 4
    by_id = client.search_for_studies(search_filters={"PatientID": study.patient_id})
    assert len(by_id) == 1
    assert client.search_for_studies(search_filters={"PatientID": study.patient_id + "X"}) == []


def test_qido_series_and_instances_with_paging(client: DICOMwebClient, study: Study) -> None:
    [series] = client.search_for_series(study.study_uid)
    assert pydicom.Dataset.from_json(series).SeriesInstanceUID == study.series_uid
    instances = client.search_for_instances(study.study_uid, study.series_uid)
    assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances} == set(study.files)
    first = client.search_for_instances(study.study_uid, study.series_uid, limit=2)
    rest = client.search_for_instances(study.study_uid, study.series_uid, limit=2, offset=2)
    pages = [pydicom.Dataset.from_json(i).SOPInstanceUID for i in first + rest]
    assert sorted(pages) == sorted(study.files)


def test_wado_gives_back_the_stored_bytes(node: Node, study: Study) -> None:
    url = f"{node.http_url}/studies/{study.study_uid}"
    answer = requests.get(
        url,
        headers={
            "Authorization": f"Bearer {node.http_token}",
            "Accept": 'multipart/related; type="application/dicom"',
        },
        timeout=60,
    )
    assert answer.status_code == 200
    parts = _multipart(answer)
    assert sorted(parts) == sorted(study.files.values())


def test_wado_transcodes_to_htj2k_on_request(node: Node, study: Study) -> None:
    first = study.datasets[0]
    answer = requests.get(
        f"{node.http_url}/studies/{study.study_uid}/series/{study.series_uid}/instances/"
        f"{first.SOPInstanceUID}",
        headers={
            "Authorization": f"Bearer {node.http_token}",
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={HTJ2K}',
        },
        timeout=60,
    )
    assert answer.status_code == 200
    [data] = _multipart(answer)
    transcoded = pydicom.dcmread(BytesIO(data))
    assert transcoded.file_meta.TransferSyntaxUID == HTJ2K
    frame = next(generate_frames(transcoded.PixelData, number_of_frames=1))
    assert np.array_equal(imagecodecs.htj2k_decode(frame), first.pixel_array)


def test_frames_native_and_htj2k(client: DICOMwebClient, study: Study) -> None:
    multi = study.datasets[-1]
    native = client.retrieve_instance_frames(
        study.study_uid, study.series_uid, multi.SOPInstanceUID, frame_numbers=[2, 5],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
    )  # fmt: skip
    frames = multi.pixel_array
    assert [bytes(f) for f in native] == [frames[1].tobytes(), frames[4].tobytes()]
    coded = client.retrieve_instance_frames(
        study.study_uid, study.series_uid, multi.SOPInstanceUID, frame_numbers=[5],
        media_types=(("image/*", "*"),),
    )  # fmt: skip
    decoded = imagecodecs.htj2k_decode(coded[0])
    assert np.array_equal(decoded, frames[4])


def test_metadata_lists_every_instance_with_pixel_data_by_reference(
    client: DICOMwebClient, study: Study
) -> None:
    metadata = client.retrieve_series_metadata(study.study_uid, study.series_uid)
    assert {item["00080018"]["Value"][0] for item in metadata} == set(study.files)
    for item in metadata:
        assert "InlineBinary" not in item["7FE00010"]
        assert "/frames/" in item["7FE00010"]["BulkDataURI"]
    # Other bulk data (here Overlay Data) comes from the URI metadata gives for it, as
    # the server wrote it (dicomweb-client rewrites BulkDataURIs it returns, dropping the
    # port: the metadata is read here as sent).
    sent = requests.get(
        f"{client.base_url}/studies/{study.study_uid}/series/{study.series_uid}/metadata",
        headers={"Authorization": client._session.headers["Authorization"]},
        timeout=60,
    ).json()
    uri = next(item["60003000"]["BulkDataURI"] for item in sent if "60003000" in item)
    [value] = client.retrieve_bulkdata(uri)
    tag = int(uri.rsplit("/", 1)[1], 16)
    sop = uri.split("/instances/")[1].split("/")[0]
    original = pydicom.dcmread(BytesIO(study.files[sop]))
    assert value == original[tag].value


def test_the_requests_ohif_makes(node: Node, study: Study) -> None:
    """The request set of OHIF v3's DICOMweb data source (qidoRoot and wadoRoot both at
    /dicomweb, as in its default-config), one by one: the study list's QIDO with OHIF's
    parameters (limit 101, offset, fuzzymatching, includefield 00081030,00080060, keys
    wrapped in wildcards), the study's series, each series' metadata, a frame."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {node.http_token}"
    root = node.http_url
    json_accept = {"Accept": "application/dicom+json"}
    # The study list: a page of studies with the fields the list shows.
    studies = session.get(
        f"{root}/studies",
        params={
            "limit": "101", "offset": "0", "fuzzymatching": "false",
            "includefield": "00081030,00080060",
            # OHIF wraps what the user typed in wildcards (withWildcard).
            "PatientName": f"*{study.family[3:]}*", "00100020": f"*{study.patient_id}*",
            "StudyDate": "19000101-20991231",
        },
        headers=json_accept, timeout=60,
    )  # fmt: skip
    assert studies.status_code == 200
    [row] = studies.json()
    assert row["0020000D"]["Value"] == [study.study_uid]
    assert "00081030" in row and "00080061" in row
    # Opening the study: its series, then each series' metadata.
    series = session.get(
        f"{root}/studies/{study.study_uid}/series", headers=json_accept, timeout=60
    )
    assert [s["0020000E"]["Value"][0] for s in series.json()] == [study.series_uid]
    metadata = session.get(
        f"{root}/studies/{study.study_uid}/series/{study.series_uid}/metadata",
        headers=json_accept, timeout=60,
    )  # fmt: skip
    assert metadata.status_code == 200 and len(metadata.json()) == 4
    # Loading an image: its frame, in any transfer syntax the viewer can decode.
    first = study.datasets[0]
    frame = session.get(
        f"{root}/studies/{study.study_uid}/series/{study.series_uid}/instances/"
        f"{first.SOPInstanceUID}/frames/1",
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
        timeout=60,
    )
    assert frame.status_code == 200
    [codestream] = _multipart(frame)
    assert "transfer-syntax=" in frame.content.split(b"\r\n\r\n", 1)[0].decode()
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), first.pixel_array)


def _multipart(answer: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related response."""
    content_type = answer.headers["Content-Type"]
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"')
    parts = []
    for chunk in answer.content.split(f"--{boundary}".encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


def test_the_node_logs_no_identity_nor_token(node: Node, study: Study) -> None:
    log = node.log_text()
    assert "DICOMweb request refused" in log  # the refusals above were logged
    for value in (study.patient_id, study.family, "19650423", node.http_token):
        assert value not in log
