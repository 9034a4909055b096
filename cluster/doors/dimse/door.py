"""The DIMSE door (pynetdicom): C-ECHO, C-STORE and Storage Commitment, translated into
calls on the archive core.

pynetdicom serves each association in a thread of its own and calls the handlers there;
the archive lives on the node's event loop. A handler hands its call to the loop and
waits for the answer, so that several associations feed the workers at once, and a
sender is slowed by the archive's backpressure (pynetdicom reads no more of an
association while its handler waits).

Who may associate: when ``peers`` is configured, only those calling AE titles, each from
its own host; an empty list admits only callers on the loopback address, which is where
the door listens unless TLS and peers are configured (``DimseSettings.check``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

from cluster.archive import Archive, ArchiveError
from cluster.doors.dimse import status
from cluster.security.exposure import exposure_problem, is_loopback
from workers.errors import Reason

log = logging.getLogger("strata.dimse")
T = TypeVar("T")

# The longest a handler waits on the archive for one instance: past the commit deadline
# the archive answers by itself, so this only guards against a loop that stopped.
_CALL_TIMEOUT_S = 900.0
_REPORT_DELAY_S = 0.2  # let the N-ACTION response go out first
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass(frozen=True)
class Peer:
    """A remote AE: who may call, and where C-MOVE and commitment reports go."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DimseSettings:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "STRATA"
    peers: tuple[Peer, ...] = ()
    max_associations: int = 10
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # set: callers must present a certificate it signed (mutual TLS)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse, naming what is missing, a door on another address than loopback
        without TLS and an allowlist of callers."""
        problem = exposure_problem(
            "DIMSE",
            self.host,
            {
                "dimse_tls_cert": self.tls_cert,
                "dimse_tls_key": self.tls_key,
                "dimse_peers": self.peers,
            },
        )
        if problem:
            raise ValueError(problem)

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)


class DimseDoor:
    """A pynetdicom AE serving the archive."""

    def __init__(
        self, archive: Archive, settings: DimseSettings, loop: asyncio.AbstractEventLoop
    ) -> None:
        settings.check()
        self._archive = archive
        self.settings = settings
        self._loop = loop
        self._server: Any = None
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.require_called_aet = True  # a caller must name this AE
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.acse_timeout = 30
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel)
        self._ae = ae

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_N_ACTION, self._commit),
            (evt.EVT_REQUESTED, self._admit),
        ]
        self._server = self._ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._tls(),
        )
        log.info(
            "DIMSE door %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            " (TLS)" if self.settings.tls_cert else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.check_hostname = False
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        if self.settings.tls_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.settings.tls_ca)
        return context

    # -- the event loop's side ----------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the node's loop and wait for it (in this association's
        thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_CALL_TIMEOUT_S)

    # -- handlers (each in its association's thread) -------------------------------------

    def _admit(self, event: Event) -> None:
        """Reject an association from a caller that is not allowed, before anything else
        is negotiated: "calling AE title not recognised" (PS3.8, A-ASSOCIATE-RJ)."""
        assoc = event.assoc
        request: Any = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        if not self._allowed(calling, assoc.requestor.address):
            log.warning("association refused: the calling AE title is not allowed from its host")
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()  # as pynetdicom's own rejections do: waits until the PDU is sent

    def _allowed(self, calling: str, address: str) -> bool:
        if not self.settings.peers:
            return is_loopback(address)
        peer = self.settings.peer(calling)
        return peer is not None and (peer.host == address or _same_host(peer.host, address))

    def _echo(self, event: Event) -> int:
        return status.SUCCESS

    def _store(self, event: Event) -> Dataset:
        data = event.encoded_dataset(include_meta=True)
        request: Any = event.request
        file_id = f"{event.assoc.name}:{request.MessageID}"
        result = self._call(self._archive.store_bytes(file_id, data, event.assoc))
        answer = Dataset()
        answer.Status = status.store_status(result.status, result.reason)
        if answer.Status != status.SUCCESS:
            answer.ErrorComment = status.error_comment(result.message)
            log.info("C-STORE refused: %s (0x%04X)", result.reason, answer.Status)
        return answer

    def _commit(self, event: Event) -> tuple[int, Dataset | None]:
        """Storage Commitment Push Model, N-ACTION: answered at once; the result follows
        in an N-EVENT-REPORT on the same association, or on a new one to the caller."""
        request: Any = event.request
        if request.RequestedSOPClassUID != StorageCommitmentPushModel or request.ActionTypeID != 1:
            return 0x0123, None  # no such action type
        information = event.action_information
        transaction = str(information.get("TransactionUID", ""))
        referenced = [
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in information.get("ReferencedSOPSequence", [])
        ]
        if not transaction or not referenced:
            return 0x0120, None  # missing attribute
        calling = event.assoc.requestor.ae_title.strip()
        report = threading.Thread(
            target=self._report,
            args=(event.assoc, calling, transaction, referenced),
            name="strata-commitment",
            daemon=True,
        )
        report.start()
        return status.SUCCESS, None

    def _report(
        self, assoc: Any, calling: str, transaction: str, referenced: list[tuple[str, str]]
    ) -> None:
        try:
            committed, failed = self._call(self._committed(referenced))
        except Exception:
            log.exception("storage commitment could not be checked")
            committed, failed = [], [(c, i, status.PROCESSING_FAILURE) for c, i in referenced]
        information = _event_information(transaction, committed, failed)
        event_type = 1 if not failed else 2
        threading.Event().wait(_REPORT_DELAY_S)
        if assoc.is_established:
            answer = assoc.send_n_event_report(
                information, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            if answer and getattr(answer[0], "Status", None) == status.SUCCESS:
                log.info("storage commitment reported on the same association")
                return
        self._report_on_new_association(calling, information, event_type)

    def _report_on_new_association(
        self, calling: str, information: Dataset, event_type: int
    ) -> None:
        peer = self.settings.peer(calling)
        if peer is None:
            log.error(
                "storage commitment: the caller left before its report and is not a "
                "configured peer (dimse_peers), so it cannot be reached"
            )
            return
        ae = AE(ae_title=self.settings.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = StorageCommitmentPushModel
        role.scu_role = False
        role.scp_role = True
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
        if not assoc.is_established:
            log.error("storage commitment: the report could not be delivered (association refused)")
            return
        try:
            answer = assoc.send_n_event_report(
                information, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            code = getattr(answer[0], "Status", None) if answer else None
            log.info("storage commitment reported on a new association (status %s)", code)
        finally:
            assoc.release()

    async def _committed(
        self, referenced: list[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
        """Which instances the archive holds durably (stored and catalogued), and why
        each of the others fails."""
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        for sop_class, sop_instance in referenced:
            try:
                record = await self._archive.instance(sop_instance)
            except ArchiveError as error:
                reason = (
                    status.NO_SUCH_OBJECT_INSTANCE
                    if error.reason == Reason.NOT_FOUND
                    else status.PROCESSING_FAILURE
                )
                failed.append((sop_class, sop_instance, reason))
                continue
            if record.sop_class_uid != sop_class:
                failed.append((sop_class, sop_instance, status.CLASS_INSTANCE_CONFLICT))
            else:
                committed.append((sop_class, sop_instance))
        return committed, failed


def _event_information(
    transaction: str, committed: list[tuple[str, str]], failed: list[tuple[str, str, int]]
) -> Dataset:
    information = Dataset()
    information.TransactionUID = transaction
    if committed:
        information.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
    if failed:
        items = []
        for sop_class, sop_instance, reason in failed:
            item = _item(sop_class, sop_instance)
            item.FailureReason = reason
            items.append(item)
        information.FailedSOPSequence = items
    return information


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _same_host(configured: str, address: str) -> bool:
    """Whether a peer's configured host (an address, or ``localhost``) is ``address``."""
    return is_loopback(configured) and is_loopback(address)
