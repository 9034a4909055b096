"""The DICOMweb door (PS3.18): STOW-RS, QIDO-RS and WADO-RS as a Starlette app, translated
into calls on the archive core.

Every request carries a bearer token (``Authorization: Bearer …``) or is answered 401;
tokens are compared in constant time. The door runs under uvicorn on the node's own event
loop (``server.py``), so a handler awaits the archive directly.

Routes, under ``/dicomweb``:

- ``POST /studies[/{study}]``: STOW-RS, ``multipart/related; type="application/dicom"``;
  one result per part (PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored);
- ``GET /studies``, ``/studies/{study}/series``, ``/studies/{study}/series/{series}/instances``,
  ``/studies/{study}/instances``, ``/series``, ``/instances``: QIDO-RS (attribute keywords
  or tags as keys, ``includefield``, ``limit``, ``offset``, ``fuzzymatching``);
- ``GET /studies/{study}[/series/{series}[/instances/{sop}]]``: WADO-RS instances,
  ``multipart/related; type="application/dicom"``, the original bytes unless the Accept
  header names another ``transfer-syntax`` (then transcoded losslessly, HTJ2K included);
- ``…/metadata``: the instances' attributes as DICOM JSON, Pixel Data as a BulkDataURI;
- ``…/instances/{sop}/frames/{numbers}``: frames, native (``application/octet-stream``)
  or as stored (``image/jphc`` for HTJ2K, or ``transfer-syntax=*``);
- ``…/instances/{sop}/bulkdata/{tag}``: the other bulk data elements metadata refers to.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from io import BytesIO
from typing import Any

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.archive import Archive, ArchiveError
from cluster.archive.find import Query, as_dataset, latest
from cluster.catalog.queries import InstanceFilters
from cluster.security.tokens import Tokens
from workers.errors import Reason
from workers.records import EXPLICIT_VR_LITTLE_ENDIAN, HTJ2K_LOSSLESS, InstanceRecord

log = logging.getLogger("strata.dicomweb")

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
# The media type of a frame in each transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    HTJ2K_LOSSLESS: "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    EXPLICIT_VR_LITTLE_ENDIAN: "application/octet-stream",
}
# HTTP status and PS3.18 failure reason (0008,1197) for each reason a file is refused.
_HTTP = {
    Reason.BAD_REQUEST: 400,
    Reason.NOT_FOUND: 404,
    Reason.DELETED: 410,  # deleted at the end of its retention
    Reason.NO_SUCH_FRAME: 404,
    Reason.TRANSCODE_REFUSED: 406,
    Reason.BUSY: 503,
    Reason.UNAVAILABLE: 503,
    Reason.TIMEOUT: 504,
    Reason.DATA_LOSS: 500,
}
_FAILURE_REASON = {  # PS3.18 Table 10.5.3-1 (and PS3.4 C-STORE statuses)
    Reason.TOO_LARGE: 0xA700,
    Reason.STORAGE_FAILED: 0xA700,
    Reason.UNAVAILABLE: 0xA700,
    Reason.UNCONFIRMED: 0xA700,
    Reason.BUSY: 0xA700,
    Reason.TIMEOUT: 0xA700,
    Reason.TRUNCATED: 0xA900,
    Reason.MISSING_UID: 0xA900,
    Reason.PIXEL_LENGTH_MISMATCH: 0xA900,
    Reason.NOT_DICOM: 0xC000,
    Reason.DELETED: 0xC000,
}
QIDO_LIMIT = 1000
_PAGING = {"limit", "offset", "includefield", "fuzzymatching"}
# What QIDO returns by default, per level (PS3.18 Tables 10.6.3-3 to -5), beside the keys.
_DEFAULT_FIELDS = {
    "STUDY": (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
        "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances", "StudyInstanceUID",
    ),
    "IMAGE": (
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
        "NumberOfFrames", "SeriesInstanceUID", "StudyInstanceUID",
    ),
}  # fmt: skip


def create_app(archive: Archive, tokens: Tokens, base_url: str = "") -> ASGIApp:
    """The DICOMweb app for ``archive``; ``base_url`` prefixes the URLs it returns."""
    web = _Web(archive, base_url.rstrip("/") + PREFIX)
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{sop}"
    routes = [
        Route(PREFIX + "/studies", web.stow, methods=["POST"]),
        Route(PREFIX + study, web.stow, methods=["POST"]),
        Route(PREFIX + "/studies", web.qido("STUDY"), methods=["GET"]),
        Route(PREFIX + "/series", web.qido("SERIES"), methods=["GET"]),
        Route(PREFIX + "/instances", web.qido("IMAGE"), methods=["GET"]),
        Route(PREFIX + study + "/series", web.qido("SERIES"), methods=["GET"]),
        Route(PREFIX + study + "/instances", web.qido("IMAGE"), methods=["GET"]),
        Route(PREFIX + series + "/instances", web.qido("IMAGE"), methods=["GET"]),
        Route(PREFIX + study + "/metadata", web.metadata, methods=["GET"]),
        Route(PREFIX + series + "/metadata", web.metadata, methods=["GET"]),
        Route(PREFIX + instance + "/metadata", web.metadata, methods=["GET"]),
        Route(PREFIX + instance + "/frames/{frames}", web.frames, methods=["GET"]),
        Route(PREFIX + instance + "/bulkdata/{tag}", web.bulkdata, methods=["GET"]),
        Route(PREFIX + study, web.instances, methods=["GET"]),
        Route(PREFIX + series, web.instances, methods=["GET"]),
        Route(PREFIX + instance, web.instances, methods=["GET"]),
    ]
    return _Authenticated(Starlette(routes=routes), tokens)


class _Authenticated:
    """Every request with a bearer token the door accepts, or 401 (ASGI middleware)."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self._app = app
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", []))
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not self._tokens.admits(given):
                log.warning("DICOMweb request refused: no valid bearer token")
                refusal = JSONResponse(
                    {"error": "a bearer token is required (Authorization: Bearer ...)"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="strata"'},
                )
                await refusal(scope, receive, send)
                return
        await self._app(scope, receive, send)


class _Web:
    def __init__(self, archive: Archive, base: str) -> None:
        self._archive = archive
        self._base = base

    # -- STOW-RS --------------------------------------------------------------------

    async def stow(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/related"):
            return _error(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        body = await request.body()
        try:
            parts = _parts(content_type, body)
        except ValueError as error:
            return _error(400, str(error))
        wanted_study = request.path_params.get("study")
        referenced, failed = [], []
        if wanted_study:
            # PS3.18 10.5.1: an instance of another study than the URL's is not stored.
            kept = []
            for data in parts:
                sop_class, sop_instance, study = _uids_of(data)
                if study == wanted_study:
                    kept.append(data)
                else:
                    failed.append(_failed_item(sop_class, sop_instance, 0xA900))
            parts = kept
        # All parts at once: they spread over the workers as a batch would.
        results = await asyncio.gather(
            *(
                self._archive.store_bytes(
                    f"stow:{id(request)}:{number}", data, request, source="dicomweb"
                )
                for number, data in enumerate(parts, 1)
            )
        )
        for number, (data, result) in enumerate(zip(parts, results, strict=True), 1):
            record = result.record
            if result.status in ("stored", "duplicate") and record is not None:
                referenced.append(_referenced_item(record, self._instance_url(request, record)))
            else:
                sop_class, sop_instance, _ = _uids_of(data)
                code = _FAILURE_REASON.get(Reason(result.reason), 0x0110)
                failed.append(_failed_item(sop_class, sop_instance, code))
                log.info("STOW-RS part %d refused: %s", number, result.reason)
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        if wanted_study:
            answer["00081190"] = {
                "vr": "UR",
                "Value": [f"{self._root(request)}/studies/{wanted_study}"],
            }
        status = 200 if not failed else (202 if referenced else 409)
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)

    # -- QIDO-RS --------------------------------------------------------------------

    def qido(self, level: str) -> Callable[[Request], Awaitable[Response]]:
        async def search(request: Request) -> Response:
            try:
                query, limit, offset = _qido_query(level, request)
                found = await self._archive.find(query, limit=offset + limit)
            except ArchiveError as error:
                return _error(_HTTP.get(error.reason, 500), error.message)
            except ValueError as error:
                return _error(400, str(error))
            matches = found.matches[offset : offset + limit]
            body = [_dicom_json(match, query.level, self._root(request)) for match in matches]
            headers = {"Warning": '299 strata "there are more matches"'} if found.truncated else {}
            if not body:
                return Response(status_code=204)
            return JSONResponse(body, media_type=DICOM_JSON, headers=headers)

        return search

    # -- WADO-RS --------------------------------------------------------------------

    async def instances(self, request: Request) -> Response:
        try:
            form = _instance_form(request.headers.get("accept", ""))
            records = await self._records(request)
        except ArchiveError as error:
            return _error(_HTTP.get(error.reason, 500), error.message)
        boundary = secrets.token_hex(16)

        async def body() -> AsyncIterator[bytes]:
            for record in records:
                try:
                    syntax, data = await self._archive.read_all(record, form)
                except ArchiveError as error:
                    # Headers are sent: the part is left out and the log says why.
                    log.error("WADO-RS: an instance could not be sent (%s)", error.reason)
                    continue
                yield _part_head(boundary, f"application/dicom; transfer-syntax={syntax}")
                yield data
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(body(), media_type=media)

    async def metadata(self, request: Request) -> Response:
        try:
            records = await self._records(request)
            answer = []
            for record in records:
                _, data = await self._archive.read_all(record)
                answer.append(_metadata(data, self._instance_url(request, record)))
        except ArchiveError as error:
            return _error(_HTTP.get(error.reason, 500), error.message)
        return JSONResponse(answer, media_type=DICOM_JSON)

    async def frames(self, request: Request) -> Response:
        try:
            numbers = [int(n) for n in request.path_params["frames"].split(",")]
        except ValueError:
            return _error(400, "frame numbers are integers separated by commas")
        accept = request.headers.get("accept", "")
        decoded = _frames_decoded(accept)
        try:
            [record] = await self._records(request)
            frames = await self._archive.frames(record, numbers, decoded=decoded)
        except ArchiveError as error:
            return _error(_HTTP.get(error.reason, 500), error.message)
        boundary = secrets.token_hex(16)
        parts = []
        media_type = "application/octet-stream"
        for frame in frames:
            media_type = FRAME_MEDIA_TYPES.get(frame.transfer_syntax, "application/octet-stream")
            head = f"{media_type}; transfer-syntax={frame.transfer_syntax}"
            parts += [_part_head(boundary, head), frame.data, b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        media = f'multipart/related; type="{media_type}"; boundary={boundary}'
        return Response(b"".join(parts), media_type=media)

    async def bulkdata(self, request: Request) -> Response:
        """The value of one bulk data element of an instance (a metadata BulkDataURI),
        as ``application/octet-stream`` in a multipart/related body."""
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError:
            return _error(400, "a bulk data tag is 8 hexadecimal digits")
        try:
            [record] = await self._records(request)
            _, data = await self._archive.read_all(record)
        except ArchiveError as error:
            return _error(_HTTP.get(error.reason, 500), error.message)
        dataset = pydicom.dcmread(BytesIO(data))
        if tag not in dataset or not isinstance(dataset[tag].value, bytes):
            return _error(404, f"the instance has no bulk data element {tag:08X}")
        boundary = secrets.token_hex(16)
        body = b"".join(
            [
                _part_head(boundary, "application/octet-stream"),
                dataset[tag].value,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
        return Response(body, media_type=media)

    async def _records(self, request: Request) -> list[InstanceRecord]:
        """The current version of each instance the URL names."""
        params = request.path_params
        if "sop" in params:
            record = await self._archive.instance(params["sop"])
            if record.study_instance_uid != params["study"] or (
                record.series_instance_uid != params["series"]
            ):
                raise ArchiveError(Reason.NOT_FOUND, "no such instance in that series")
            return [record]
        filters = InstanceFilters(study_uid=params["study"], series_uid=params.get("series"))
        current = latest(await self._archive.find_instances(filters, limit=1_000_000))
        if not current:
            raise ArchiveError(Reason.NOT_FOUND, "no stored instance matches that URL")
        return current

    def _root(self, request: Request) -> str:
        """The absolute URL of the DICOMweb root, as the caller reached it (PS3.18 URIs
        are absolute), unless a base URL was configured."""
        return self._base if self._base != PREFIX else str(request.base_url).rstrip("/") + PREFIX

    def _instance_url(self, request: Request, record: InstanceRecord) -> str:
        return (
            f"{self._root(request)}/studies/{record.study_instance_uid}/series/"
            f"{record.series_instance_uid}/instances/{record.sop_instance_uid}"
        )


# -- helpers ------------------------------------------------------------------------------


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related message (the stdlib's MIME parser)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ValueError("the body is not a multipart message (is the boundary right?)")
    parts = []
    for part in message.iter_parts():
        kind = part.get_content_type()
        if kind != "application/dicom":
            raise ValueError(f"a part is {kind}; STOW-RS here takes application/dicom parts")
        payload = part.get_payload(decode=True)
        parts.append(payload if isinstance(payload, bytes) else b"")
    if not parts:
        raise ValueError("the multipart message has no parts")
    return parts


def _part_head(boundary: str, content_type: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def _uids_of(data: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study Instance UID of a part, those that can be read."""
    names = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=True, specific_tags=names)
        found = [str(dataset.get(name, "")) for name in names]
    except Exception:  # noqa: BLE001 - a part that is not DICOM has none
        return "", "", ""
    return found[0], found[1], found[2]


def _referenced_item(record: InstanceRecord, url: str) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [record.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [record.sop_instance_uid]},
        "00081190": {"vr": "UR", "Value": [url]},
    }


def _failed_item(sop_class: str, sop_instance: str, reason: int) -> dict[str, Any]:
    item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [reason]}}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def _keyword(name: str) -> str:
    """A QIDO key (keyword, or tag as 8 hex digits) as a keyword; ValueError if neither."""
    if tag_for_keyword(name) is not None:
        return name
    if len(name) == 8:
        try:
            keyword = keyword_for_tag(int(name, 16))
        except ValueError:
            keyword = ""
        if keyword:
            return keyword
    raise ValueError(f"{name!r} is not an attribute keyword or tag")


def _qido_query(level: str, request: Request) -> tuple[Query, int, int]:
    params = request.query_params
    keys: dict[str, str] = {}
    for name, value in params.multi_items():
        if name in _PAGING:
            continue
        keys[_keyword(name)] = value
    for name in ("study", "series"):
        if name in request.path_params:
            keys["StudyInstanceUID" if name == "study" else "SeriesInstanceUID"] = (
                request.path_params[name]
            )
    fields: list[str] = []
    for value in params.getlist("includefield"):
        for name in value.split(","):
            if name and name != "all":
                fields.append(_keyword(name.strip()))
    try:
        limit = min(int(params.get("limit", QIDO_LIMIT)), QIDO_LIMIT)
        offset = max(int(params.get("offset", 0)), 0)
    except ValueError:
        raise ValueError("limit and offset are integers") from None
    if params.get("fuzzymatching", "false").lower() == "true":
        # Fuzzy matching of names: each component as a prefix (PS3.18 8.3.4.6 leaves it
        # to the origin server).
        for name in ("PatientName", "ReferringPhysicianName"):
            if keys.get(name) and not keys[name].endswith("*"):
                keys[name] = keys[name] + "*"
    for keyword in [*_DEFAULT_FIELDS[level], *fields]:
        keys.setdefault(keyword, "")
    return Query(level, keys), limit, offset


def _dicom_json(match: dict[str, str], level: str, base: str) -> dict[str, Any]:
    """One QIDO match as DICOM JSON (PS3.18 F.2)."""
    dataset = as_dataset(match)
    study = match.get("StudyInstanceUID", "")
    url = f"{base}/studies/{study}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{match.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{match.get('SOPInstanceUID', '')}"
    dataset.RetrieveURL = url
    return dataset.to_json_dict()


def _metadata(data: bytes, url: str) -> dict[str, Any]:
    """An instance's attributes as DICOM JSON; Pixel Data (and other bulk data) by URI."""
    dataset = pydicom.dcmread(BytesIO(data))

    def bulk(element: Any) -> str:
        if element.tag == 0x7FE00010:
            return (
                f"{url}/frames/1"
                if "NumberOfFrames" not in dataset
                else (
                    f"{url}/frames/"
                    + ",".join(str(n) for n in range(1, int(dataset.NumberOfFrames) + 1))
                )
            )
        return f"{url}/bulkdata/{element.tag:08X}"

    answer: dict[str, Any] = dataset.to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=bulk
    )
    meta = dataset.file_meta
    if "TransferSyntaxUID" in meta:
        answer["00020010"] = {"vr": "UI", "Value": [str(meta.TransferSyntaxUID)]}
    return answer


def _media_params(accept: str) -> list[dict[str, str]]:
    """Each media range of an Accept header as its parameters (``type``, ``transfer-syntax``
    and the range itself as ``media``)."""
    ranges = []
    for item in accept.split(","):
        pieces = [piece.strip() for piece in item.split(";")]
        params = {"media": pieces[0].lower()}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        ranges.append(params)
    return ranges


def _instance_form(accept: str) -> str:
    """What form WADO-RS instances go in for this Accept header: ``original`` unless a
    transfer syntax is named (``*`` is the original)."""
    for params in _media_params(accept):
        syntax = params.get("transfer-syntax")
        if syntax and syntax != "*":
            return syntax
    return "original"


def _frames_decoded(accept: str) -> bool:
    """Whether frames go native (``application/octet-stream`` with no other transfer
    syntax) rather than as stored."""
    for params in _media_params(accept):
        kind = params.get("type", params["media"]).lower()
        syntax = params.get("transfer-syntax", "")
        if kind == "application/octet-stream" and syntax in ("", EXPLICIT_VR_LITTLE_ENDIAN):
            return True
        if kind.startswith("image/") or syntax:
            return False
    return True
