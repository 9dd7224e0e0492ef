"""C-MOVE and C-GET SCP (PS3.4 C.4.2 and C.4.3): the archive sends what a request names.

pynetdicom's own C-MOVE and C-GET service asks a handler for decoded datasets and opens the
sub-association itself, so it can neither send a file as stored (without decoding it), nor
choose a transfer syntax the destination accepted, nor say why a request was refused, nor
count the instances of an unreachable destination as failed. ``ArchiveQueryRetrieve`` keeps
pynetdicom's C-FIND and does C-MOVE and C-GET here: resolve the request with the retrieve
service, open the sub-association (C-MOVE) or use the requester's (C-GET), send each file as
stored when its transfer syntax was accepted (never decoded: ``archive.dimse.storescu``)
or transcoded otherwise, and answer with pending, completed, failed and warning counts and
the failed SOP instances.
"""

from __future__ import annotations

import logging
import socket
import time
from io import BytesIO
from types import SimpleNamespace

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config, association, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive import query, retrieve
from archive.dimse import fastpath, find, status, storescu
from archive.dimse.find import identifier_keys
from archive.dimse.nodes import audit_dimse, node_access_for

log = logging.getLogger("archive.dimse")

# Where the fast path is not available (TLS), files whose transfer syntax the peer accepted
# still go out as stored, read in chunks by pynetdicom.
_config.STORE_SEND_CHUNKED_DATASET = True

MODEL_LEVELS = {
    str(PatientRootQueryRetrieveInformationModelMove): ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    str(StudyRootQueryRetrieveInformationModelMove): ("STUDY", "SERIES", "IMAGE"),
    str(PatientRootQueryRetrieveInformationModelGet): ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    str(StudyRootQueryRetrieveInformationModelGet): ("STUDY", "SERIES", "IMAGE"),
}
RETRIEVE_MODELS = [
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
MAX_SUBOPERATIONS = 65535  # the sub-operation counts are US
PENDING_INTERVAL = 0.25  # seconds between two pending responses
CANCEL_POLL = 0.01  # seconds between two looks for a C-CANCEL while answering


class ArchiveQueryRetrieve(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service with the archive's C-FIND (on the fast path),
    C-MOVE and C-GET."""

    _polled = 0.0

    def is_cancelled(self, msg_id: int) -> bool:
        """Whether a C-CANCEL for ``msg_id`` came (PS3.7 9.3.2.3). On an inline association
        nothing reads the socket while a request is served, so what the peer sent is read
        here first, at most every ``CANCEL_POLL`` seconds."""
        now = time.monotonic()
        if now - self._polled >= CANCEL_POLL:
            self._polled = now
            fastpath.poll(self.assoc)
        return super().is_cancelled(msg_id)

    def _c_find_scp(self, req, context) -> None:
        if fastpath.available(self.assoc):
            find.serve(self, req, context)
        else:
            super()._c_find_scp(req, context)

    def _move_scp(self, req: C_MOVE, context) -> None:
        _Retrieval(self, req, context, C_MOVE()).run()

    def _get_scp(self, req: C_GET, context) -> None:
        _Retrieval(self, req, context, C_GET()).run()


def serve_find(assoc, request: fastpath.FastFind) -> None:
    """A C-FIND-RQ read by the fast path (``fastpath.FastFind``): the same C-FIND SCP as
    ``ArchiveQueryRetrieve._c_find_scp``, without pynetdicom's decoding of the command set
    into a message and a primitive (PS3.7 9.1.2)."""
    command = request.command
    req = SimpleNamespace(
        AffectedSOPClassUID=UID(command["AffectedSOPClassUID"]),
        MessageID=int(command["MessageID"]),
        Identifier=BytesIO(bytes(request.identifier)),
    )
    find.serve(ArchiveQueryRetrieve(assoc), req, assoc._accepted_cx[request.context_id])


def install() -> None:
    """Make pynetdicom serve the Query/Retrieve SOP classes with ``ArchiveQueryRetrieve``."""
    original = association.uid_to_service_class
    if getattr(original, "archive", False):
        return

    def lookup(uid: str):
        service = original(uid)
        return ArchiveQueryRetrieve if service is QueryRetrieveServiceClass else service

    lookup.archive = True  # type: ignore[attr-defined]
    association.uid_to_service_class = lookup


class _Retrieval:
    """One C-MOVE or C-GET request, from its identifier to its final response."""

    def __init__(self, service: QueryRetrieveServiceClass, req, context, rsp) -> None:
        self.service = service
        self.req = req
        self.context_id = int(context.context_id)
        self.syntax = context.transfer_syntax[0]
        self.is_move = isinstance(rsp, C_MOVE)
        self.rsp = rsp
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        self.calling = str(service.assoc.requestor.ae_title).strip()
        self.remaining = self.completed = self.failed = self.warning = 0
        self.failed_uids: list[str] = []

    # ------------------------------------------------------------------ answers

    def respond(self, code: int, comment: str = "", failed_list: bool = False) -> None:
        rsp = self.rsp
        rsp.Status = code
        rsp.ErrorComment = comment[:64] if comment else None
        pending = code == status.PENDING
        rsp.NumberOfRemainingSuboperations = self.remaining if (pending or code == status.CANCEL) else None
        counted = pending or code in (status.SUCCESS, status.CANCEL, status.SUB_OPERATIONS_WARNING) or self.failed
        rsp.NumberOfCompletedSuboperations = self.completed if counted else None
        rsp.NumberOfFailedSuboperations = self.failed if counted else None
        rsp.NumberOfWarningSuboperations = self.warning if counted else None
        rsp.Identifier = None
        if failed_list and self.failed_uids:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = self.failed_uids
            rsp.Identifier = BytesIO(
                encode(ds, self.syntax.is_implicit_VR, self.syntax.is_little_endian, self.syntax.is_deflated)
            )
        self.service.dimse.send_msg(rsp, self.context_id)

    def refuse(self, code: int, reason: str) -> None:
        log.warning("%s from %s refused (0x%04X): %s", self.kind, self.calling, code, reason)
        self.respond(code, reason)

    @property
    def kind(self) -> str:
        return "C-MOVE" if self.is_move else "C-GET"

    # ------------------------------------------------------------------ the request

    def run(self) -> None:
        node = node_access_for(self.service.assoc)
        if not node.may_retrieve:
            audit_dimse(self.service.assoc, "retrieve", outcome="denied", details={"reason": "the node may not retrieve"})
            return self.refuse(status.NOT_AUTHORIZED, f"calling AE title {self.calling} may not retrieve")
        try:
            identifier = decode(
                self.req.Identifier, self.syntax.is_implicit_VR, self.syntax.is_little_endian, self.syntax.is_deflated
            )
            level, keys = identifier_keys(identifier)
            model = str(self.req.AffectedSOPClassUID)
            if level not in MODEL_LEVELS.get(model, ()):
                raise query.QueryError(f"query level {level or '(none)'} is not one of {'/'.join(MODEL_LEVELS[model])}")
            items = retrieve.instances(level, keys, queryset=node.scope(query.MODELS[level]))
        except query.QueryError as exc:
            return self.refuse(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            return self.refuse(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"the identifier cannot be decoded: {exc}")
        if len(items) > MAX_SUBOPERATIONS:
            return self.refuse(status.UNABLE_TO_CALCULATE_MATCHES, f"{len(items)} instances match; at most 65535 per request")
        self.remaining = len(items)
        audit_dimse(
            self.service.assoc,
            "retrieve",
            keys=keys,
            details={"service": self.kind, "level": level, "instances": len(items), "destination": str(getattr(self.req, "MoveDestination", "") or "").strip()},
        )
        if self.is_move:
            peer = self.open_destination(items)
            if peer is None:
                return None
        else:
            peer = self.service.assoc
        try:
            self.send_all(peer, items)
        finally:
            if self.is_move and peer.is_established:
                peer.release()
        return None

    def open_destination(self, items: list[retrieve.StoredInstance]):
        from archive.models import RemoteNode

        name = str(self.req.MoveDestination).strip()
        node = RemoteNode.objects.filter(ae_title=name, may_retrieve=True).first()
        if node is None:
            self.refuse(status.MOVE_DESTINATION_UNKNOWN, f"move destination {name} is not a known DICOM node")
            return None
        if not items:
            self.respond(status.SUCCESS)
            return None
        ae = self.service.assoc.ae
        peer = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            contexts=_contexts(items),
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )
        if not peer.is_established:
            self.failed, self.remaining = len(items), 0
            self.failed_uids = [item.sop_instance_uid for item in items]
            reason = f"cannot associate with {node.ae_title} at {node.host}:{node.port}"
            log.warning("C-MOVE from %s: %s; %d sub-operations failed", self.calling, reason, self.failed)
            self.respond(status.UNABLE_TO_PERFORM_SUB_OPERATIONS, reason, failed_list=True)
            return None
        return peer

    def send_all(self, peer, items: list[retrieve.StoredInstance]) -> None:
        if not items:
            return self.respond(status.SUCCESS)
        message_id = int(self.req.MessageID)
        last_pending = time.monotonic()
        originator = {"originator_aet": self.calling, "originator_id": message_id} if self.is_move else {}
        with storescu.Sender(peer, **originator) as sender:
            for index, item in enumerate(items):
                if self.service.is_cancelled(message_id):
                    log.info("%s from %s cancelled after %d of %d", self.kind, self.calling, index, len(items))
                    return self.respond(status.CANCEL, failed_list=True)
                if not peer.is_established or sender.broken:
                    self.failed += self.remaining
                    self.failed_uids += [i.sop_instance_uid for i in items[index:]]
                    self.remaining = 0
                    break
                self.count(item, sender.store(item, (message_id + index + 1) % 65536))
                self.remaining -= 1
                # Pending responses are optional (PS3.4 C.4.2.3.1): one per PENDING_INTERVAL
                # shows progress; one per instance cost a fifth of the time.
                if self.remaining and time.monotonic() - last_pending >= PENDING_INTERVAL:
                    self.respond(status.PENDING)
                    last_pending = time.monotonic()
        if self.failed and not (self.completed or self.warning):
            code = status.UNABLE_TO_PERFORM_SUB_OPERATIONS
        elif self.failed or self.warning:
            code = status.SUB_OPERATIONS_WARNING
        else:
            code = status.SUCCESS
        log.info(
            "%s from %s: %d completed, %d failed, %d warnings",
            self.kind, self.calling, self.completed, self.failed, self.warning,
        )
        return self.respond(code, failed_list=bool(self.failed))

    def count(self, item: retrieve.StoredInstance, code: int | None) -> None:
        """Count one C-STORE sub-operation by the status it got (None: not sent)."""
        if code == status.SUCCESS:
            self.completed += 1
        elif code is not None and (code & 0xF000) == 0xB000:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(item.sop_instance_uid)


def _no_delay(event: evt.Event) -> None:
    """TCP_NODELAY on the sub-association's socket: without it every C-STORE waits for the
    peer's delayed ACK, about 40 ms."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _contexts(items: list[retrieve.StoredInstance]) -> list:
    """Presentation contexts for a C-MOVE sub-association: for each SOP class, one per stored
    transfer syntax (so the files can go as stored) and one uncompressed (to transcode)."""
    wanted = retrieve.wanted_syntaxes(items)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        stored = [s for s in syntaxes if s not in retrieve.UNCOMPRESSED]
        for syntax in stored:
            contexts.append(build_context(sop_class, [syntax]))
        contexts.append(build_context(sop_class, list(retrieve.UNCOMPRESSED)))
    if len(contexts) > MAX_CONTEXTS:  # too many: uncompressed only, one per SOP class
        contexts = [build_context(sop, list(retrieve.UNCOMPRESSED)) for sop in list(wanted)[:MAX_CONTEXTS]]
    return contexts
