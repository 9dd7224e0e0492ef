"""The DICOM SCP: a pynetdicom AE serving C-ECHO and C-STORE (PS3.4 Annexes A and B).

``Scp`` is what ``runscp`` runs and what the tests start on a free port. Each association
runs in its own thread; its database connection is closed when it ends, and one log line
says what it did.
"""

from __future__ import annotations

import copy
import functools
import logging
import socket
import threading
import time

from django.conf import settings
from django.db import connection
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from archive import storage
from archive.dimse import fastpath, move
from archive.dimse.find import handle_find
from archive.dimse.move import RETRIEVE_MODELS
from archive.dimse.store import AssociationStats, InFlight, handle_store, store_file
from archive.dimse.nodes import AuditWriter, audit_stores, node_access_for
from archive.ingest import announce_series

log = logging.getLogger("archive.dimse")

# Receive C-STORE datasets straight into a file (event.dataset_path): only the header is
# parsed, the pixel data is never decoded.
_config.STORE_RECV_CHUNKED_DATASET = True
# pynetdicom's own debug logging of every PDU and DIMSE message runs (builds summaries) for
# each of the dozens of PDUs of an instance even when nothing is logged; our association
# log line says what matters. Warnings and errors are still logged.
_config.LOG_HANDLER_LEVEL = "none"
# C-FIND/C-MOVE identifiers carry patient data: never in the logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


QUERY_RETRIEVE_MODELS = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    *RETRIEVE_MODELS,
]
move.install()

# Identifies pacsportal in association negotiation (PS3.7 D.3.3.2); a UUID-derived UID (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.179811143393248142663940145561689325540"
IMPLEMENTATION_VERSION_NAME = "PACSPORTAL_0_1"

# pynetdicom accepts, for each presentation context, the first of these that the requestor
# proposes: so this is our order of preference. Uncompressed explicit VR first, then the
# lossless compressions, then the other uncompressed encodings, and lossy ones last, so
# that a modality offering both never compresses lossily because of us.
_LOSSLESS = [
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000MCLossless,
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
]
_UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRBigEndian]
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, *_LOSSLESS, *_UNCOMPRESSED] + [
    uid for uid in ALL_TRANSFER_SYNTAXES if uid not in (ExplicitVRLittleEndian, *_LOSSLESS, *_UNCOMPRESSED)
]


class _SharedContext(PresentationContext):
    """A supported presentation context that every association shares, uncopied.

    pynetdicom deep-copies the supported contexts for each new association; with every
    storage SOP class times every transfer syntax that is thousands of objects, 1.6 ms of
    one core per association even as shallow copies (bench/query.py, C-ECHO). Negotiation
    only reads them (``negotiate_as_acceptor`` builds new contexts for its answer), and
    tests/archive/test_scp.py checks that they stay unchanged.
    """

    def __deepcopy__(self, memo: dict) -> PresentationContext:
        return self


class _SharedContexts(list):
    """The supported contexts' list, shared by every association like its items."""

    def __deepcopy__(self, memo: dict) -> list:
        return self


def _shared(contexts: list[PresentationContext]) -> list[PresentationContext]:
    for context in contexts:
        context.__class__ = _SharedContext
    return _SharedContexts(contexts)


class PacsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with TCP_NODELAY on every connection."""

    def get_request(self):  # type: ignore[override]
        request, address = super().get_request()
        _no_delay(request)
        return request, address

    standby: "Standby | None" = None

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        """Give the connection to the standby association, whose thread is waiting for one;
        without a standby, prepare one here, in the accepting thread, instead of in a
        pynetdicom handler thread that starts the association's."""
        try:
            standby = self.standby
            assoc = (standby.take() if standby is not None else None) or self.prepare()
            if standby is not None:
                assoc.pacs_on_idle = standby.refill  # the next is prepared once this one is served
            self.hand_over(assoc, request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver: report, close, go on accepting
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def bind(self, event, handler, args=None) -> None:  # type: ignore[override]
        super().bind(event, handler, args)
        self._handlers_changed()

    def unbind(self, event, handler) -> None:  # type: ignore[override]
        super().unbind(event, handler)
        self._handlers_changed()

    def _handlers_changed(self) -> None:
        if self.standby is not None:
            self.standby.discard()  # prepared with the handlers of before
        negotiations = getattr(self.ae, "pacs_negotiations", None)
        if negotiations is not None:
            negotiations.clear()  # answers given with the handlers of before

    def prepare(self) -> fastpath.PacsAssociation:
        """An acceptor association set up with everything that does not depend on its
        connection (what pynetdicom's ``RequestHandler._create_association`` does), its
        thread started and waiting for ``hand_over``."""
        ae = self.ae
        assoc = fastpath.PacsAssociation(ae, MODE_ACCEPTOR)
        assoc.name = "StandbyAcceptor"  # not "AcceptorThread": not an active association yet
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.ae_title
        assoc.acceptor.address_info = AddressInformation.from_tuple(self.server_address)
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy.deepcopy(self.contexts)
        for event, handlers in self._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        assoc.pacs_go = threading.Event()
        assoc.start()
        return assoc

    def hand_over(self, assoc: fastpath.PacsAssociation, request: socket.socket, client_address) -> None:
        """Give a prepared association its connection and let its thread serve it."""
        assoc._server = self
        assoc.name = f"AcceptorThread@{_stamp()}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=request))
        assoc.requestor.address_info = _peer_address(client_address)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": client_address})
        assoc.pacs_go.set()  # type: ignore[union-attr] - set by prepare

    def service_actions(self) -> None:
        """Nothing between requests. (pynetdicom runs a full ``gc.collect()`` every 60
        turns of the accept loop, tens of milliseconds with the GIL held in a process that
        has Django loaded; Python's own collector reclaims finished associations.)"""


class SharedSocketServer(PacsAssociationServer):
    """One of several SCP processes accepting on one listening socket (made by ``runscp``
    before it forks them), where the least busy process takes each new association.

    Every process waits on the socket; when a connection arrives, a process already
    serving associations waits a moment before it accepts, so an idle one takes it
    (``SO_REUSEPORT`` would instead spread connections by a hash of their addresses,
    and often put two associations in one process while another sits idle).
    """

    listen_socket: socket.socket

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # the socket already listens

    def get_request(self):  # type: ignore[override]
        busy = len(self.active_associations)
        if busy:
            time.sleep(min(0.002 * busy, 0.02))
        request, address = self.socket.accept()  # non-blocking: OSError if another took it
        request.setblocking(True)
        _no_delay(request)
        return request, address

    def server_close(self) -> None:
        self.socket.close()  # close our descriptor only: the others still listen on it


class Standby:
    """Keeps one acceptor association prepared (``PacsAssociationServer.prepare``) so that a
    new connection finds its association built and its thread running: the requestor's
    A-ASSOCIATE-RQ is answered without waiting for either (most of a millisecond).

    A thread of its own prepares the next one ``DELAY`` seconds after the association that
    took one is established and waits for its peer (``refill``, called from that
    association's thread), so that neither the wake-up nor the work takes the interpreter
    lock from the association between its A-ASSOCIATE-RQ and its first request.
    """

    DELAY = 0.01

    def __init__(self, server: PacsAssociationServer) -> None:
        self.server = server
        self._assoc: fastpath.PacsAssociation | None = None
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._generation = 0  # counts discards: one prepared during a discard is dropped
        self._thread = threading.Thread(target=self._run, name="scp-standby", daemon=True)

    def start(self) -> None:
        self._wanted.set()
        self._thread.start()

    def take(self) -> fastpath.PacsAssociation | None:
        """The prepared association, or None (then the caller builds one). The next is
        prepared after ``refill``."""
        with self._lock:
            assoc, self._assoc = self._assoc, None
        return assoc

    def refill(self) -> None:
        """Prepare another, if none is prepared (``DELAY`` seconds from now)."""
        self._wanted.set()

    def discard(self) -> None:
        """Drop the prepared association (its handlers changed); prepare another."""
        with self._lock:
            assoc, self._assoc = self._assoc, None
            self._generation += 1
        if assoc is not None:
            _cancel(assoc)
        self._wanted.set()

    def close(self) -> None:
        """Prepare no more; end the prepared association's thread."""
        with self._lock:
            self._closed = True
            assoc, self._assoc = self._assoc, None
        self._wanted.set()
        if assoc is not None:
            _cancel(assoc)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            time.sleep(self.DELAY)
            with self._lock:
                if self._closed:
                    return
                if self._assoc is not None:
                    continue
                generation = self._generation
            try:
                assoc = self.server.prepare()
            except Exception:  # noqa: BLE001 - then each connection builds its own, as before
                log.exception("cannot prepare a standby association")
                return
            with self._lock:
                if self._closed or self._assoc is not None or generation != self._generation:
                    _cancel(assoc)
                    if generation != self._generation:
                        self._wanted.set()  # handlers changed meanwhile: prepare another
                else:
                    self._assoc = assoc


_stamps: tuple[int, str] = (0, "")


def _stamp() -> str:
    """The current second as pynetdicom names its acceptor threads (``%Y%m%d%H%M%S``),
    formatted once a second: ``strftime`` takes tens of microseconds between an accept
    and its A-ASSOCIATE-AC."""
    global _stamps
    now = int(time.time())
    second, text = _stamps
    if second != now:
        text = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
        _stamps = (now, text)
    return text


def _peer_address(client_address: tuple) -> AddressInformation:
    """The peer's AddressInformation from ``accept``'s numeric address, without the
    ``getaddrinfo`` that pynetdicom's constructor runs to resolve a host name."""
    info = AddressInformation.__new__(AddressInformation)
    info._addr = client_address[0]
    info.port = client_address[1]
    info.flowinfo = client_address[2] if len(client_address) == 4 else 0
    info.scope_id = client_address[3] if len(client_address) == 4 else 0
    return info


def _cancel(assoc: fastpath.PacsAssociation) -> None:
    """End a prepared association's waiting thread without serving anything."""
    assoc.pacs_cancelled = True
    assoc.pacs_go.set()  # type: ignore[union-attr] - set by prepare


def _no_delay(request: socket.socket) -> None:
    try:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def listening_socket(bind: str, port: int, backlog: int = 128) -> socket.socket:
    """Return a non-blocking listening socket to share between SCP processes."""
    sock = socket.create_server((bind, port), backlog=backlog)
    sock.setblocking(False)
    return sock


class ArchiveAE(AE):
    """The archive's AE: a prepared association (``Standby``), whose thread waits for a
    connection, is not one of its active associations (pynetdicom counts those against
    ``maximum_associations``)."""

    @property
    def active_associations(self) -> list[Association]:
        return [a for a in super().active_associations if getattr(a, "pacs_go", None) is None or a.pacs_go.is_set()]


class Scp:
    """The archive's SCP. ``start()`` listens; ``stop()`` finishes the stores in flight."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        bind: str = "0.0.0.0",
        max_associations: int = 32,
        allowed_calling_aets: list[str] | None = None,
        max_pdu_size: int = 0,
        listen_socket: socket.socket | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.address = (bind, port)
        self.listen_socket = listen_socket
        self.in_flight = InFlight()
        self._stats: dict[int, AssociationStats] = {}
        self._stats_lock = threading.Lock()
        self.server: PacsAssociationServer | None = None

        ae = ArchiveAE(ae_title=ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.require_called_aet = True
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu_size
        if allowed_calling_aets:
            ae.require_calling_aet = allowed_calling_aets
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for model in QUERY_RETRIEVE_MODELS:
            ae.add_supported_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for context in AllStoragePresentationContexts:
            # scp_role: a C-GET requester may take the Storage SCP role (PS3.7 D.3.3.4).
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES, scu_role=False, scp_role=True)
        # C-STOREs read by the fast path (archive.dimse.fastpath.PacsDIMSE) are stored here,
        # as EVT_C_STORE's handler stores those pynetdicom reads.
        ae.pacs_store = functools.partial(store_file, stats_for=self.stats_for, in_flight=self.in_flight)
        # Received files are flushed when put in place; their writing starts as they arrive.
        ae.pacs_writeback = storage.start_writeback if settings.PACS_SYNC_STORAGE else None
        # C-FINDs read by the fast path are answered here, as ArchiveQueryRetrieve does.
        ae.pacs_find = move.serve_find
        # Answers to association requests seen before (fastpath.Negotiations).
        ae.pacs_negotiations = fastpath.Negotiations()
        # The associations' audit events (archive.dimse.nodes.audit_dimse) are written here.
        self.audit = ae.pacs_audit = AuditWriter()
        self.ae = ae

    @property
    def port(self) -> int:
        """The port actually bound (useful when started on port 0)."""
        assert self.server is not None, "not started"
        return int(self.server.server_address[1])

    def handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, handle_store, [self.stats_for, self.in_flight]),
            (evt.EVT_C_FIND, handle_find),
            (evt.EVT_RELEASED, self._ended, ["released"]),
            (evt.EVT_ABORTED, self._ended, ["aborted"]),
            (evt.EVT_REJECTED, self._rejected),
        ]

    def stats_for(self, assoc: Association) -> AssociationStats:
        """Return the counters of ``assoc``, created on its first store."""
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                requestor = assoc.requestor
                calling = str(requestor.ae_title).strip()
                stats = AssociationStats(calling, f"{requestor.address}:{requestor.port}")
                stats.may_store = node_access_for(assoc).may_store
                self._stats[id(assoc)] = stats
            return stats

    def _ended(self, event: evt.Event, how: str) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        requestor = event.assoc.requestor
        if stats is None:
            stats = AssociationStats(str(requestor.ae_title).strip(), f"{requestor.address}:{requestor.port}")
        handled = stats.stored + stats.duplicates + stats.failed
        log.info(
            "association %s: calling AE %s from %s, %d stored, %d duplicates, %d failed%s",
            how,
            stats.calling_ae,
            stats.address,
            stats.stored,
            stats.duplicates,
            stats.failed,
            f" ({stats.seconds / handled * 1000:.1f} ms per instance)" if handled else "",
        )
        audit_stores(event.assoc, stats)
        announce_series(self, set(stats.stored_per_series))
        if threading.current_thread() is event.assoc:
            connection.close()  # the association's thread is ending; its connection goes too

    def _rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "association rejected: calling AE %s from %s:%s called %s",
            str(requestor.ae_title).strip(),
            requestor.address,
            requestor.port,
            str(event.assoc.acceptor.ae_title).strip(),
        )

    def start(self) -> None:
        """Bind and serve in a background thread."""
        server_class: type[PacsAssociationServer] = PacsAssociationServer
        if self.listen_socket is not None:
            server_class = type("WorkerServer", (SharedSocketServer,), {"listen_socket": self.listen_socket})
        self.server = self.ae.make_server(
            self.address,
            evt_handlers=self.handlers(),
            server_class=server_class,
            contexts=_shared(self.ae.supported_contexts),
        )
        self.ae._servers.append(self.server)
        self.server.standby = Standby(self.server)
        self.server.standby.start()
        thread = threading.Thread(target=self.server.serve_forever, name="scp-acceptor", daemon=True)
        thread.start()
        log.info("SCP %s listening on %s:%d", self.ae_title, self.address[0], self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: accept no association, let the C-STOREs being stored finish (up to
        ``timeout`` seconds), refuse any later one, then abort the associations left.

        A dataset still being received when the association is aborted is discarded
        (the sender was never told it was stored); nothing is ever half-written.
        """
        if self.server is None:
            return
        server = self.server
        server.shutdown()  # stops accepting and closes the listening socket
        if server.standby is not None:
            server.standby.close()
        if not self.in_flight.close(timeout):
            log.warning("stores still running after %.0f s", timeout)
        aborted = list(server.active_associations)
        for assoc in aborted:
            assoc.abort()
        for assoc in aborted:
            assoc.join(2.0)  # their end's audit events (EVT_ABORTED) go to the writer first
        self.audit.stop()
        self.server = None
