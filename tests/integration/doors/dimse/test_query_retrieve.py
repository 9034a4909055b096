"""C-FIND, C-GET and C-MOVE with DCMTK's findscu, getscu and movescu: searches on patient
identity (names with wildcards, Patient ID, birth date, accession) at every level and in
both models, and retrieves that give back the bytes that were sent, or the same pixels
transcoded losslessly when the caller accepts only uncompressed syntaxes."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.integration.conftest import DIMSE_PEERS, ct_instances, dataset_bytes, dcmtk, on_the_wire
from tests.integration.node import Node

pytestmark = pytest.mark.skipif(
    shutil.which("findscu") is None, reason="DCMTK is not installed (make test installs it)"
)


class Study:
    """One study of a patient of its own, sent with storescu: two CT series, and an MR
    image compressed with JPEG 2000."""

    def __init__(self, node: Node, folder: Path) -> None:
        tag = uuid.uuid4().hex[:8].upper()
        self.patient_id = f"QR-{tag}"
        self.name = f"QRTEST{tag}^ALICE^M"
        self.accession = f"A{tag}"
        self.study_uid = generate_uid()
        self.series = [generate_uid(), generate_uid()]
        self.paths: list[Path] = []
        for number, (name, data) in enumerate(ct_instances(4, f"qr-{tag}")):
            dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
            self._identify(dataset, self.series[number % 2], number + 1)
            path = folder / f"{name}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            self.paths.append(path)
        compressed = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
        self.mr_series = generate_uid()
        self._identify(compressed, self.mr_series, 1)
        self.compressed = folder / "mr-j2k.dcm"
        compressed.save_as(self.compressed, enforce_file_format=True)
        self.paths.append(self.compressed)
        self.runs = [[*map(str, self.paths[:-1])], ["-xv", str(self.compressed)]]
        for arguments in self.runs:
            done = dcmtk(
                "storescu", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port), *arguments
            )
            assert done.returncode == 0, done.stderr
        self.sent = on_the_wire(self.runs)  # what DCMTK put on the wire, by SOP Instance UID

    def _identify(self, dataset: pydicom.Dataset, series: str, number: int) -> None:
        dataset.PatientName = self.name
        dataset.PatientID = self.patient_id
        dataset.PatientBirthDate = "19700214"
        dataset.PatientSex = "F"
        dataset.AccessionNumber = self.accession
        dataset.StudyInstanceUID = self.study_uid
        dataset.StudyDate = "20240305"
        dataset.StudyDescription = "QR test"
        dataset.SeriesInstanceUID = series
        dataset.InstanceNumber = number
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID


@pytest.fixture(scope="module")
def study(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Study:
    return Study(node, tmp_path_factory.mktemp("qr"))


def find(node: Node, folder: Path, *keys: str, model: str = "-S") -> list[pydicom.Dataset]:
    """findscu's responses to a search with ``keys``, as data sets."""
    folder.mkdir(parents=True, exist_ok=True)
    arguments = [item for key in keys for item in ("-k", key)]
    done = dcmtk(
        "findscu", model, "-aec", "STRATA", "-X", "-od", str(folder), *arguments,
        "127.0.0.1", str(node.dimse_port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def test_find_studies_by_name_with_a_wildcard_returns_identity(
    node: Node, study: Study, tmp_path: Path
) -> None:
    family = study.name.split("^")[0]
    [match] = find(
        node, tmp_path, "QueryRetrieveLevel=STUDY", f"PatientName={family.lower()}*",
        "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
        "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "StudyDescription",
    )  # fmt: skip
    assert match.StudyInstanceUID == study.study_uid
    assert match.PatientID == study.patient_id
    assert str(match.PatientBirthDate) == "19700214"
    assert match.AccessionNumber == study.accession
    assert set(match.ModalitiesInStudy) == {"CT", "MR"}
    assert int(match.NumberOfStudyRelatedInstances) == 5
    assert match.StudyDescription == "QR test"
    assert match.QueryRetrieveLevel == "STUDY"


@pytest.mark.parametrize(
    "keys, expected",
    [
        (("PatientID={patient_id}",), 1),
        (("AccessionNumber={accession}",), 1),
        (("PatientBirthDate=19700214", "PatientID={patient_id}"), 1),
        (("PatientBirthDate=19700101-19701231", "PatientID={patient_id}"), 1),
        (("PatientBirthDate=19710214", "PatientID={patient_id}"), 0),
        (("StudyDate=20240301-20240331", "PatientID={patient_id}"), 1),
        (("StudyDate=20250101-", "PatientID={patient_id}"), 0),
        (("PatientName={family}^AL?CE*",), 1),
        (("PatientName={family}^BOB",), 0),
        (("PatientID={patient_id}", "ModalitiesInStudy=MR"), 1),
        (("PatientID={patient_id}", "ModalitiesInStudy=US"), 0),
    ],
)
def test_find_studies_matches_as_ps3_4_says(
    node: Node, study: Study, tmp_path: Path, keys: tuple[str, ...], expected: int
) -> None:
    values = {
        "patient_id": study.patient_id,
        "accession": study.accession,
        "family": study.name.split("^")[0],
    }
    filled = [key.format(**values) for key in keys]
    found = find(node, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", *filled)
    assert [match.StudyInstanceUID for match in found] == [study.study_uid] * expected


def test_find_at_patient_series_and_image_levels(node: Node, study: Study, tmp_path: Path) -> None:
    [patient] = find(
        node, tmp_path / "patient", "QueryRetrieveLevel=PATIENT",
        f"PatientID={study.patient_id}", "PatientName", "NumberOfPatientRelatedStudies",
        model="-P",
    )  # fmt: skip
    assert str(patient.PatientName) == study.name
    assert int(patient.NumberOfPatientRelatedStudies) == 1
    series = find(
        node, tmp_path / "series", "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.study_uid}", "SeriesInstanceUID", "Modality",
        "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    counts = {
        s.SeriesInstanceUID: (s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series
    }
    assert counts == {
        study.series[0]: ("CT", 2),
        study.series[1]: ("CT", 2),
        study.mr_series: ("MR", 1),
    }
    images = find(
        node, tmp_path / "image", "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.study_uid}", f"SeriesInstanceUID={study.series[0]}",
        "SOPInstanceUID", "InstanceNumber", "SOPClassUID",
    )  # fmt: skip
    expected = {
        uid
        for uid, data in study.sent.items()
        if pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True).get("SeriesInstanceUID")
        == study.series[0]
    }
    assert {image.SOPInstanceUID for image in images} == expected
    assert sorted(int(image.InstanceNumber) for image in images) == [1, 3]
    # In the patient root model, the studies of one patient.
    [one] = find(
        node, tmp_path / "patient-study", "QueryRetrieveLevel=STUDY",
        f"PatientID={study.patient_id}", "StudyInstanceUID", model="-P",
    )  # fmt: skip
    assert one.StudyInstanceUID == study.study_uid


def received(folder: Path) -> dict[str, pydicom.Dataset]:
    return {
        (dataset := pydicom.dcmread(path)).SOPInstanceUID: dataset
        for path in folder.iterdir()
        if path.is_file()
    }


def getscu(node: Node, folder: Path, *arguments: str) -> dict[str, Path]:
    """Run getscu; what it received (to disk as it arrived: +B), by SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    done = dcmtk(
        "getscu", "-S", "+B", "-aec", "STRATA", "-od", str(folder), *arguments,
        "127.0.0.1", str(node.dimse_port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Failures" not in done.stdout + done.stderr, done.stdout + done.stderr
    return {pydicom.dcmread(path).SOPInstanceUID: path for path in folder.iterdir()}


def test_getscu_gets_series_and_images_back_byte_for_byte(
    node: Node, study: Study, tmp_path: Path
) -> None:
    # A series of native CT, proposed (by default) in the uncompressed syntaxes.
    series = getscu(
        node, tmp_path / "series", "-k", "QueryRetrieveLevel=SERIES",
        "-k", f"StudyInstanceUID={study.study_uid}", "-k", f"SeriesInstanceUID={study.series[0]}",
    )  # fmt: skip
    # The JPEG 2000 image, proposed in JPEG 2000 first: it goes back as it came.
    mr = pydicom.dcmread(study.compressed, stop_before_pixels=True).SOPInstanceUID
    image = getscu(
        node, tmp_path / "image", "+xv", "-k", "QueryRetrieveLevel=IMAGE",
        "-k", f"StudyInstanceUID={study.study_uid}", "-k", f"SeriesInstanceUID={study.mr_series}",
        "-k", f"SOPInstanceUID={mr}",
    )  # fmt: skip
    assert len(series) == 2 and list(image) == [mr]
    for uid, path in (series | image).items():
        assert dataset_bytes(path.read_bytes()) == study.sent[uid]


def test_getscu_accepting_only_uncompressed_gets_the_same_pixels_transcoded(
    node: Node, study: Study, tmp_path: Path
) -> None:
    original = pydicom.dcmread(study.compressed)
    done = dcmtk(
        "getscu", "-S", "-aec", "STRATA", "-od", str(tmp_path),
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study.study_uid}",
        "-k", f"SeriesInstanceUID={study.mr_series}",
        "-k", f"SOPInstanceUID={original.SOPInstanceUID}",
        "127.0.0.1", str(node.dimse_port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [got] = received(tmp_path).values()
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_movescu_moves_a_series_to_a_configured_peer(
    node: Node, study: Study, tmp_path: Path
) -> None:
    # movescu stores what it receives in its working directory.
    done = subprocess.run(
        [
            "movescu", "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", "STRATA",
            "+P", str(DIMSE_PEERS["MOVESCU"]), "+xa", "+B",
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_uid}",
            "-k", f"SeriesInstanceUID={study.series[1]}",
            "127.0.0.1", str(node.dimse_port),
        ],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = received(tmp_path)
    assert len(got) == 2
    for uid in got:
        stored = next(tmp_path.glob(f"*{uid}*"))
        assert dataset_bytes(stored.read_bytes()) == study.sent[uid]


def test_a_move_to_an_unknown_destination_is_refused(
    node: Node, study: Study, tmp_path: Path
) -> None:
    done = dcmtk(
        "movescu", "-S", "-d", "-aet", "MOVESCU", "-aem", "ELSEWHERE", "-aec", "STRATA",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
        "127.0.0.1", str(node.dimse_port),
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert "a801" in output.lower(), output


def test_the_node_logs_no_identity_it_was_asked_for(node: Node, study: Study) -> None:
    """Every search above named the patient; the node's log holds none of it."""
    log = node.log_text()
    assert "C-FIND at STUDY level" in log  # the searches were logged, without their keys
    for value in (study.patient_id, study.name.split("^")[0], study.accession, "19700214"):
        assert value not in log
