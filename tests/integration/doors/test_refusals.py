"""Every door refuses whom it should, with the protocol's own refusal: a call without a
valid token (gRPC UNAUTHENTICATED, HTTP 401), and plain-TCP clients against doors that
speak TLS (a node of its own, its certificates made for the test, never committed)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from cluster.client import StrataClient
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from tests.integration.node import Node, free_port


def test_grpc_calls_without_a_valid_token_are_unauthenticated(node: Node) -> None:
    for token in ("", "not-the-token"):
        with grpc.insecure_channel(node.address) as channel:
            catalog = pb_grpc.CatalogStub(channel)
            metadata = [("authorization", f"Bearer {token}")] if token else []
            with pytest.raises(grpc.RpcError) as refused:
                catalog.FindStudies(pb.FindRequest(), metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health checks (what orchestrators' probes make) need none.
    with grpc.insecure_channel(node.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with StrataClient(node.address, node.http_token) as client:  # and with it, served
        assert client.catalog.FindStudies(pb.FindRequest(), timeout=30) is not None


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "strata-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "door.crt", folder / "door.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Path]]:
    root = tmp_path_factory.mktemp("tls-node")
    cert, key = _certificate(root)
    with Node(
        root,
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        http_port=str(free_port()),
        http_tls_cert=str(cert),
        http_tls_key=str(key),
        dimse_port=str(free_port()),
        dimse_tls_cert=str(cert),
        dimse_tls_key=str(key),
    ) as node:
        yield node, cert


def test_plain_tcp_clients_are_refused_by_tls_doors(tls_node: tuple[Node, Path]) -> None:
    node, cert = tls_node
    # gRPC: a plain channel does not get through; one that checks the certificate does.
    with StrataClient(node.address, node.http_token) as plain, pytest.raises(grpc.RpcError):
        plain.catalog.FindStudies(pb.FindRequest(), timeout=10)
    with StrataClient(node.address, node.http_token, tls_ca=str(cert)) as client:
        assert client.catalog.FindStudies(pb.FindRequest(), timeout=30) is not None
    # DICOMweb: plain HTTP gets no answer; HTTPS with the token does.
    https = node.http_url.replace("http://", "https://")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{node.http_url}/studies", timeout=10)
    answer = requests.get(
        f"{https}/studies",
        headers={"Authorization": f"Bearer {node.http_token}"},
        verify=str(cert),
        timeout=30,
    )
    assert answer.status_code in (200, 204)
    # DIMSE: DCMTK's echoscu over plain TCP is not associated; over TLS it is.
    port = str(node.dimse_port)
    plain_echo = subprocess.run(
        ["echoscu", "-aec", "STRATA", "127.0.0.1", port],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert plain_echo.returncode != 0
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    context = ssl.create_default_context(cafile=str(cert))
    assoc = ae.associate(
        "127.0.0.1", node.dimse_port, ae_title="STRATA", tls_args=(context, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        # A file of several PDUs (the door takes 1 MiB ones), each of many TLS records.
        assert assoc.send_c_store(_large_ct()).Status == 0x0000
    finally:
        assoc.release()


def _large_ct() -> Dataset:
    """pydicom's small CT with 1024 × 1024 pixels of noise: about 2 MiB."""
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    dataset.Rows = dataset.Columns = 1024
    noise = np.random.default_rng(5).integers(0, 4096, (1024, 1024), dtype=np.uint16)
    dataset.PixelData = noise.tobytes()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
