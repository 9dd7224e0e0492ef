"""The archive's DIMSE fast path: pynetdicom's associations without its polling, and bulk
messages written straight onto the socket.

pynetdicom (3.0) moves every PDU through two threads that poll: the DUL thread sleeps
between looks at the socket and at its queue of PDUs to send, and the association thread
sleeps 1 ms between looks at its queue of received messages. Each message then waits for
those sleeps, and each PDU costs a round of queue hand-offs and state-machine calls. For a
C-STORE of a 512 KB CT slice to a peer taking 16 KB PDUs that is 33 PDUs; for a C-FIND of
500 answers, 500 messages. So:

- ``PacsDUL`` waits on the socket and a wake-up socket with ``select`` instead of sleeping:
  it reads a PDU as soon as it arrives and sends a queued one at once. Its socket I/O and
  state-machine actions run under ``io_lock``.
  It reads each PDU whole (pynetdicom reads 4 KB at a time).
- ``PacsAssociation`` waits on its message queue instead of sleeping, so a request is
  served as soon as its last PDU is in.
- ``PacsDIMSE`` receives C-STOREs for an AE with a ``pacs_store`` (the archive's ``Scp``)
  itself: the command set decoded by ``wire``, the data set written to the receive file as
  it arrives, the request stored and answered by the association's thread. A C-ECHO there
  is answered the same way, when EVT_C_ECHO has pynetdicom's default handler. It writes
  C-STORE and C-ECHO responses with ``wire`` from the association's thread.
- ``send_message`` writes a whole DIMSE message (or many) as P-DATA-TF PDUs with one
  ``sendmsg`` call, under ``io_lock`` and behind anything already queued for the DUL.
- ``borrowed`` lends the association's socket to the calling thread for a run of
  request/response exchanges (C-STORE sub-operations): the DUL stops reading it, the caller
  writes its requests and reads the responses itself, and any other PDU it meets (an
  A-ABORT, an A-RELEASE-RQ) goes back to the DUL, which handles it as usual.
- On an acceptor's association (a plain socket), ``PacsDUL`` runs *inline*: no DUL thread;
  the association's own thread turns the state machine whenever it waits (``pump``), so an
  association is one thread and a PDU is read, decoded and served without changing threads.
- ``Negotiations`` answers an A-ASSOCIATE-RQ seen before, byte for byte, with the
  A-ASSOCIATE-AC pynetdicom gave it, as soon as it is read, and ``PacsACSE`` replays the
  negotiation that gave that answer instead of negotiating again. An idle association's
  A-RELEASE-RQ is answered as it is read.
- C-ECHO and C-FIND requests are read by ``PacsDIMSE`` too (``FastEcho``, ``FastFind``).

Everything else (the first negotiation of a request, the state machine, release, abort,
timeouts, every other service) stays pynetdicom's. Messages that go the fast way do not
trigger pynetdicom's EVT_PDU_SENT, EVT_DIMSE_SENT, EVT_PDU_RECV or EVT_DIMSE_RECV
notifications, and a C-STORE or C-FIND received the fast way calls ``ae.pacs_store`` or
``ae.pacs_find`` instead of EVT_C_STORE's or EVT_C_FIND's handlers.
``install()`` makes pynetdicom build its associations from these classes; it is written
against pynetdicom 3.0 (pinned in requirements.txt) and refuses any other major version.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import queue
import select
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import acse as pynetdicom_acse
from pynetdicom import association as pynetdicom_association
from pynetdicom import evt
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE, P_DATA

from archive.dimse import wire

log = logging.getLogger("archive.dimse")

# The longest a quiet DUL or association thread waits before looking at its timers and
# flags again. Each wait ends at once for what needs an answer (data on the socket, a
# queued PDU, a complete message, a release or an abort); a shorter one would only wake the
# thread to find nothing, and take the interpreter lock from the thread doing the work.
IDLE_WAIT = 0.05
ACCEPTOR_WAIT = 0.05
# A requestor's reactor turns as fast as pynetdicom's own: its user's thread pauses the
# reactor before each request and waits until the reactor has seen that.
REQUESTOR_WAIT = 0.001
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers a call.
_MAX_BUFFERS = 1000
_JOIN_BYTES = 256 * 1024  # buffers written joined up to this size (``_sendmsg_all``)


_PDU_TYPES = frozenset(range(0x01, 0x08))  # PS3.8 9.3.1: A-ASSOCIATE-RQ .. A-ABORT
# A-RELEASE-RQ and A-RELEASE-RP PDUs (PS3.8 9.3.6, 9.3.7): their reserved fields are zeros.
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _recv_exactly(sock: socket.socket, count: int, head: bytes = b"") -> bytearray:
    """``head`` followed by the next ``count`` bytes from ``sock``: shorter only when the peer
    closed the connection first. Raises what ``recv_into`` raises (``TimeoutError`` too)."""
    data = bytearray(len(head) + count)
    data[: len(head)] = head
    view = memoryview(data)
    got = len(head)
    while got < len(data):
        n = sock.recv_into(view[got:])
        if n == 0:
            del view
            del data[got:]
            break
        got += n
    return data


class FastPathUnavailable(RuntimeError):
    """The association was not built by ``install()``'d classes (or uses TLS)."""


class Interrupted(OSError):
    """The peer sent something other than the expected response (an abort, a release
    request, bytes that are no PDU), or the connection broke; the DUL takes it from here."""


class _InlineQueue(queue.Queue):
    """A queue the DUL fills. On an inline association (``PacsDUL.inline``) the thread that
    owns it waits for an item by turning the DUL's reactor itself (``PacsDUL.pump``): there
    is no DUL thread to fill it meanwhile. Any other thread, and every threaded association,
    waits as on a plain queue."""

    def __init__(self, dul: "PacsDUL") -> None:
        super().__init__()
        self._dul = dul

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        dul = self._dul
        if not dul.inline or threading.get_ident() != dul.owner:
            return super().get(block, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return super().get(block=False)
            except queue.Empty:
                pass
            if dul._kill_thread or (dul.state_machine.current_state == "Sta1" and dul.event_queue.empty() and dul.to_provider_queue.empty()):
                raise queue.Empty  # nothing can come: stopped, or idle with the connection closed
            if not block:
                if dul.pump(0.0):
                    continue  # it did something: look again
                raise queue.Empty
            remaining = IDLE_WAIT if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise queue.Empty
            dul.pump(min(remaining, IDLE_WAIT))


class _UserQueue(_InlineQueue):
    """The DUL's queue of primitives for the association: putting an A-RELEASE or an
    abort there also wakes the association's reactor, which otherwise would see it only at
    the end of its wait for a message. (Not A-ASSOCIATE: a wake-up left in the message
    queue would read as "no response" to a request sent right after the association.)"""

    def __init__(self, assoc: Any, dul: "PacsDUL") -> None:
        super().__init__(dul)
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        dimse = getattr(self._assoc, "dimse", None)
        if dimse is not None and isinstance(item, (A_RELEASE, A_ABORT, A_P_ABORT)):
            dimse.msg_queue.put((None, None))  # read as "no message": the reactor checks the rest

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        dul = self._dul
        if not dul.user_waiting and self._assoc.is_requestor:
            dul.user_waiting = True  # its A-ASSOCIATE answer may now be read (``PacsDUL._holding``)
            dul.wake()
        return super().get(block, timeout)


class _ReceivedPData:
    """A received P-DATA-TF (PS3.8 9.3.5) as the state machine takes it from the DUL: what
    its ``to_primitive()`` gives, each PDV as pynetdicom keeps it (context ID, then the
    message control header and the fragment) as a view of the received PDU's buffer, instead
    of pynetdicom's PDU and PDV item objects and their copies of the bytes."""

    __slots__ = ("_primitive",)

    def __init__(self, primitive: P_DATA) -> None:
        self._primitive = primitive

    @classmethod
    def of(cls, data: bytearray) -> "_ReceivedPData | None":
        """The PDU in ``data`` (its 6-byte header included), or None when its PDVs are
        malformed (pynetdicom's decoder then says so)."""
        try:
            values = list(wire.iter_pdv_data(memoryview(data)[6:]))
        except wire.WireError:
            return None
        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # then (ID, bytes) tuples, as pynetdicom's to_primitive
        primitive.presentation_data_value_list.extend(values)
        return cls(primitive)

    def to_primitive(self) -> P_DATA:
        return self._primitive


class PacsDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, waiting on its socket instead of polling.

    An acceptor's DUL on a plain socket runs *inline*: no thread of its own. The
    association's thread turns the reactor (``pump``) whenever it waits for something the
    DUL brings (a primitive, a DIMSE message) and sends what it queues at once (``flush``).
    Accepting an association then starts one thread instead of three, and each received
    PDU is read, decoded and acted on by the thread that serves it, with no hand-offs of the
    interpreter lock between a DUL thread and the association's. Other threads (a stop's
    abort) queue their primitives and wake the owner, which acts on them.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self.inline = False  # no thread: the owner's thread runs the reactor (``start``)
        self.owner: int | None = None
        self._request: bytes | None = None  # the A-ASSOCIATE-RQ PDU, until it is answered
        self._request_pdu: Any = None  # and as pynetdicom decoded it
        self._early: bytes | None = None  # the A-ASSOCIATE-AC sent before negotiation (``Negotiations``)
        self._outcome: Outcome | None = None  # the negotiation that gave it, to replay (``PacsACSE``)
        self._released: bytes | None = None  # the A-RELEASE-RP sent as the A-RELEASE-RQ was read
        self.user_waiting = False  # a requestor's association waits for its A-ASSOCIATE answer (``_UserQueue``)
        self.to_user_queue = _UserQueue(assoc, self)
        self.io_lock = threading.RLock()
        self.lent = False  # the socket is lent to another thread (``borrowed``)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def start(self) -> None:
        """Run inline for an acceptor on a plain socket (called from the association's
        thread, in its ``run_reactor``); start the DUL thread otherwise."""
        raw = getattr(self.socket, "socket", None)
        if self.assoc.is_acceptor and raw is not None and not isinstance(raw, ssl.SSLSocket):
            self.inline = True
            self.owner = threading.get_ident()
            self._idle_timer.start()
            self.assoc._dul_ready.set()
            return
        super().start()

    def is_alive(self) -> bool:
        if self.inline:
            return not self._kill_thread
        return super().is_alive()

    def pump(self, timeout: float) -> bool:
        """Inline: one turn of the reactor (``run_reactor``'s loop body): a queued primitive
        or a received PDU becomes an event, and one event is acted on. When there is nothing
        to do, wait up to ``timeout`` seconds for the socket or a wake-up, then look once
        more. Returns True when an event was acted on."""
        for attempt in (0, 1):
            if self._kill_thread:
                return False
            acted = self._turn()
            if acted is None:
                return False
            if acted:
                return True
            if attempt or timeout <= 0:
                return False
            self._wait(timeout)
        return False

    def _holding(self) -> bool:
        """Whether the socket is left unread for now. The peer has its A-ASSOCIATE-AC while
        ours is still being negotiated: what it sends next (its first request) waits in the
        socket until the state machine has sent the AC itself (Sta6); read in Sta3 it would
        be an unexpected PDU. Likewise the peer has its A-RELEASE-RP (and may close the
        connection) while the release is still on its way through the state machine (Sta6,
        Sta8)."""
        state = self.state_machine.current_state
        if self._early is not None and state in ("Sta1", "Sta2", "Sta3"):
            return True
        if state == "Sta5" and not self.user_waiting:
            # A requestor's answer (PS3.8 9.3.3/9.3.4) is read once its association waits
            # for it: after sending the request, pynetdicom takes a closed connection for a
            # failed one, and a rejection read and acted on (the connection closed, AE-4)
            # before it looked would read as a connection that never came up (aborted).
            return True
        return self._released is not None and state in ("Sta6", "Sta8")

    def _release_early(self) -> None:
        """An A-RELEASE-RQ read while the association is idle (PS3.8 7.2): no request is
        being served or waits to be, so the answer can only be an A-RELEASE-RP (AR-2 then
        AR-4 of PS3.8 9.2), sent now; the state machine then goes through the release as
        usual and ``_send`` does not send the RP again."""
        assoc = self.assoc
        if not (self.inline and assoc.is_acceptor and threading.get_ident() == self.owner and not self.lent):
            return
        dimse = assoc.dimse
        if assoc._is_paused or getattr(dimse, "_store", None) is not None or dimse.message is not None:
            return
        if not dimse.msg_queue.empty() or self.state_machine.current_state != "Sta6":
            return
        try:
            self.socket.socket.sendall(RELEASE_RP)  # type: ignore[union-attr]
        except OSError:
            return
        self._released = RELEASE_RP

    def _answer_early(self, request: bytes) -> Known | None:
        """An A-ASSOCIATE-RQ just read (PS3.8 9.3.2): keep it, and when the AE's
        ``Negotiations`` know the answer to these very bytes, send it now and return what
        they know (else None)."""
        self._request = request
        negotiations = getattr(self.assoc.ae, "pacs_negotiations", None)
        if negotiations is None or not self.inline or not negotiations.may_answer(self.assoc):
            return None
        known = negotiations.get(request) or negotiations.wait_or_lead(request)
        if known is None:
            return None  # this association negotiates; its answer settles the request (_send)
        raw = self.socket.socket  # type: ignore[union-attr]
        try:
            raw.sendall(known.answer)
        except OSError:
            return None  # the state machine finds the connection gone
        self._early = known.answer
        self._outcome = known.outcome
        return known

    def replayable(self) -> Outcome | None:
        """The negotiation to replay for this association's request (``PacsACSE``): the one
        whose answer was sent early, when nothing watches the sending of that answer (no
        handler for EVT_ACSE_SENT, EVT_PDU_SENT or EVT_FSM_TRANSITION, which the replay
        does not trigger); else None, and pynetdicom negotiates."""
        if self._early is None or self._outcome is None or self.state_machine.current_state != "Sta3":
            return None
        if any(self.assoc.get_handlers(event) for event in REPLAY_UNSEEN_EVENTS):
            return None
        return self._outcome

    def accepted_early(self, primitive: Any) -> None:
        """The replayed negotiation's A-ASSOCIATE response (accept): its PDU went early, so
        the state machine takes AE-7's transition (Sta3 + Evt7 -> Sta6, PS3.8 9.2) without
        building and encoding it again."""
        self._request = self._early = self._outcome = None
        with self.io_lock:
            self.state_machine.transition("Sta6")

    def _send(self, pdu: Any) -> None:
        """Send a PDU (pynetdicom's ``_send``). The answer to an A-ASSOCIATE-RQ is checked
        against the one sent early, if any, and not sent twice; a new accepting answer is
        remembered by the AE's ``Negotiations``. An A-RELEASE-RP sent early is not sent again."""
        request = self._request
        if self._released is not None and isinstance(pdu, A_RELEASE_RP):
            self._released = None  # sent by _release_early: an A-RELEASE-RP has no variable part
            evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
            return
        if request is None or not isinstance(pdu, (A_ASSOCIATE_AC, A_ASSOCIATE_RJ)):
            super()._send(pdu)
            return
        early, self._request, self._early = self._early, None, None
        data = pdu.encode()
        negotiations = getattr(self.assoc.ae, "pacs_negotiations", None)
        if early is not None:
            if data == early:
                evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
                return
            # Cannot happen while the AE's configuration and handlers stay as they were
            # (Negotiations.clear when they change); the peer holds an answer we do not give.
            log.error("the association was answered before its negotiation, differently; aborting it")
            if negotiations is not None:
                negotiations.clear()
            self._abort_hard()
            return
        if isinstance(pdu, A_ASSOCIATE_AC) and negotiations is not None and negotiations.may_answer(self.assoc):
            known = Known(data, self._request_pdu, Outcome.of(self.assoc), _copy_primitive(self.assoc.requestor.primitive))
            negotiations.put(request, known, self.assoc.pacs_generation)
        if negotiations is not None:
            negotiations.settle(request)  # associations waiting for this negotiation go on
        if self.socket is not None:
            self.socket.send(data)
            evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
        else:
            log.warning("attempted to send data over a closed connection")

    def _turn(self) -> bool | None:
        """One turn of the reactor (pynetdicom's ``run_reactor`` loop body, PS3.8 9.2): a
        queued primitive or a received PDU becomes an event, and one event is acted on.
        True when an event was acted on, False when there was nothing to do, None when a
        failure aborted the association."""
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        with self.io_lock:
            try:
                if self._process_recv_primitive():
                    pass
                elif not self.lent and not self._holding() and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort on any failure
                log.error("DUL failure, aborting the association: %s", exc)
                self._abort_hard()
                return None
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                return False
            self.state_machine.do_action(event)
            return True

    def flush(self) -> None:
        """Inline, in the owner's thread: act on everything queued until the primitives
        queued for sending are sent (the state machine's events in order)."""
        while (self.to_provider_queue.qsize() or self.event_queue.qsize()) and self.pump(0.0):
            pass

    def finish(self, timeout: float) -> None:
        """Inline, when the association's thread ends: act on what is left until the state
        machine is idle (Sta1, the connection closed) or ``timeout`` seconds pass; then stop."""
        deadline = time.monotonic() + timeout
        try:
            while not self._kill_thread and self.state_machine.current_state != "Sta1":
                if time.monotonic() > deadline:
                    log.warning("association ended in %s; closing its connection", self.state_machine.current_state)
                    sock = self.socket
                    if sock is not None:
                        sock.close()
                    break
                self.pump(min(IDLE_WAIT, max(deadline - time.monotonic(), 0.0)))
        finally:
            self._kill_thread = True
            self.close_wake()

    def close_wake(self) -> None:
        """Close the wake-up socket pair (the thread that reads it ends). An association that
        ends before answering its request lets those waiting for its negotiation go on."""
        self._wake_r.close()
        self._wake_w.close()
        request, self._request = self._request, None
        negotiations = getattr(self.assoc.ae, "pacs_negotiations", None)
        if request is not None and negotiations is not None:
            negotiations.settle(request)

    def wake(self) -> None:
        """Make the reactor look at its queues now."""
        try:
            self._wake_w.send(b"\x00")
        except OSError:
            pass  # already woken (buffer full) or closed: either way nothing to do

    def send_pdu(self, primitive: Any) -> None:  # type: ignore[override]
        super().send_pdu(primitive)
        if self.inline and threading.get_ident() == self.owner:
            self.flush()
        else:
            self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def deliver(self, data: bytes | bytearray) -> None:
        """Hand a PDU that a borrower read to the state machine, as if the DUL had read it."""
        try:
            pdu, event = self._decode_pdu(bytearray(data))
        except Exception:  # noqa: BLE001 - whatever cannot be decoded is an invalid PDU (Evt19)
            self.event_queue.put("Evt19")
        else:
            self.event_queue.put(event)
            self._recv_pdu.put(pdu)
        self.wake()

    def _read_pdu_data(self) -> None:
        """Read one PDU from the socket (pynetdicom's ``_read_pdu_data``, PS3.8 9.3.1), its
        body in one buffer with as few ``recv`` calls as the kernel allows.

        pynetdicom reads 4 KB at a time: a 128 KB P-DATA-TF took 32 calls, each giving up the
        interpreter lock and waiting to take it back from the association's thread. The
        events are pynetdicom's: Evt17 when the connection breaks or the PDU is cut short,
        Evt19 for an unknown PDU type or one that cannot be decoded.
        """
        raw = getattr(self.socket, "socket", None)
        if raw is None or isinstance(raw, ssl.SSLSocket):
            super()._read_pdu_data()
            return
        try:
            head = _recv_exactly(raw, 6)
            if len(head) < 6:
                self.event_queue.put("Evt17")
                return
            pdu_type, _, length = wire.PDU_HEADER.unpack(head)
            if pdu_type not in _PDU_TYPES:
                log.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")
                return
            data = _recv_exactly(raw, length, head)
        except OSError as exc:  # TimeoutError included
            log.error("connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(data) != 6 + length:
            log.error("the received PDU is shorter than expected (%d of %d bytes)", len(data), 6 + length)
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x01 and self.assoc.is_acceptor and self.state_machine.current_state in ("Sta1", "Sta2"):
            # (Sta1 still, when the connection's Evt5 is queued behind this read)
            known = self._answer_early(bytes(data))
            if known is not None:  # decoded before: pynetdicom's PDU object, only read from
                evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": known.decoded})
                self.event_queue.put("Evt6")  # A-ASSOCIATE-RQ received
                self._recv_pdu.put(known.request())
                return
        elif pdu_type == 0x05 and data == RELEASE_RQ:
            self._release_early()
        pdu = _ReceivedPData.of(data) if pdu_type == wire.P_DATA_TF else None
        if pdu is not None:
            self.event_queue.put("Evt10")  # P-DATA-TF received
            self._recv_pdu.put(pdu)
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: whatever cannot be decoded is Evt19
            log.error("unable to decode the received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        if pdu_type == 0x01:
            self._request_pdu = pdu
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def run_reactor(self) -> None:
        """The DUL loop (pynetdicom's ``run_reactor``, PS3.8 9.2), blocking in ``select``
        while there is nothing to do instead of sleeping a fixed time."""
        self._idle_timer.start()
        try:
            while not self._kill_thread:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                acted = self._turn()
                if acted is None:
                    return
                if not acted:
                    self._wait()
        finally:
            self.close_wake()

    def _wait(self, timeout: float = IDLE_WAIT) -> None:
        if getattr(self.assoc, "pacs_on_idle", None) is not None and self.state_machine.current_state == "Sta6":
            self.assoc.idle()  # established, and nothing to do until the peer sends
        watched: list[Any] = [self._wake_r]
        raw = getattr(self.socket, "socket", None)
        if raw is not None and not self.lent and getattr(self.socket, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            if raw.fileno() >= 0:
                watched.append(raw)
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)  # the socket closed under us: the next turn sees it
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def _abort_hard(self) -> None:
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        try:
            self.socket.send(abort.encode())  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the connection may be gone already
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class _NotFast(Exception):
    """A message the fast C-STORE reception leaves to pynetdicom."""


class FastStore:
    """A C-STORE-RQ read by ``PacsDIMSE`` (PS3.7 9.3.1.1): its command set, decoded by
    ``wire``, and the Part 10 file its data set was written into as it arrived, with the
    file's SHA-256 worked out on the way (each fragment hashed while it is still in the
    processor's cache, instead of the whole file read back for it afterwards)."""

    kind = "C-STORE"

    def __init__(self, command: dict[str, Any], context_id: int, file: "ReceiveFile", writeback: Any = None) -> None:
        self.command = command
        self.context_id = context_id
        self.file = file
        self.writeback = writeback  # ae.pacs_writeback: start writing the received file to disk
        self.size = file.tell()
        self._digest = hashlib.sha256() if self.size == 0 else None  # of every byte written here
        self.sha256: str | None = None  # the whole file's, once done

    @property
    def path(self) -> str:
        return self.file.name  # type: ignore[return-value]

    def write(self, fragment: bytes | memoryview) -> None:
        self.file.write(fragment)
        self.size += len(fragment)
        if self._digest is not None:
            self._digest.update(fragment)

    def done(self) -> None:
        # The whole file is handed to the disk once, when its last fragment is in: one
        # request to the device instead of one per PDU (docs/performance.md, 2026-12-07).
        if self.writeback is not None:
            self.writeback(self.file.fileno(), 0, self.size)
        self.file.close()
        if self._digest is not None:
            self.sha256 = self._digest.hexdigest()

    def discard(self) -> None:
        self.file.close()
        os.unlink(self.path)


class FastFind:
    """A C-FIND-RQ read by ``PacsDIMSE`` (PS3.7 9.1.2.1): its command set, decoded by
    ``wire``, and its identifier's bytes, for the AE's ``pacs_find``."""

    kind = "C-FIND"

    def __init__(self, command: dict[str, Any], context_id: int) -> None:
        self.command = command
        self.context_id = context_id
        self.identifier = bytearray()

    def write(self, fragment: memoryview) -> None:
        self.identifier += fragment

    def done(self) -> None:
        pass

    def discard(self) -> None:
        self.identifier = bytearray()


# The Query/Retrieve FIND SOP classes a C-FIND-RQ is read here for (PS3.4 C.6.1.1, C.6.2.1).
FIND_MODELS = frozenset({"1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"})


class FastEcho:
    """A C-ECHO-RQ read by ``PacsDIMSE`` (PS3.7 9.3.5.1), answered Success by the
    association's thread without pynetdicom's message objects or Verification service."""

    def __init__(self, command: dict[str, Any], context_id: int) -> None:
        self.command = command
        self.context_id = context_id


VERIFICATION = "1.2.840.10008.1.1"


class PacsDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, receiving C-STOREs for the archive's SCP itself and
    writing C-STORE and C-ECHO responses straight onto the socket.

    On an association accepted by an AE that stores through ``ae.pacs_store`` (the archive's
    ``Scp``), a C-STORE-RQ's command set is decoded by ``wire`` as soon as it is complete and
    its data set written to the receive file fragment by fragment, in the DUL thread: no
    pydicom command set, no DIMSE message or primitive objects (PS3.7 9.3.1.1). The request
    then goes to the association's thread as a ``FastStore``. Any other message, or a C-STORE
    this does not take (an unknown context, a SOP class that is not a storage one, values
    that are not plain ASCII), goes pynetdicom's way, unchanged.

    Responses to C-STORE and C-ECHO (PS3.7 9.3.1.2, 9.3.5.2) are encoded with ``wire`` and
    sent by the association's own thread, instead of being encoded with pydicom and queued
    for the DUL thread to send. Every other message goes pynetdicom's way.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        if isinstance(assoc.dul, PacsDUL):
            self.msg_queue = _InlineQueue(assoc.dul)  # the owner pumps an inline DUL while it waits
        self._held: list[Any] = []  # P-DATA primitives of a command set not yet complete
        self._command = bytearray()
        self._store: FastStore | FastFind | None = None  # the request whose data set is arriving

    def receive_primitive(self, primitive: Any) -> None:  # type: ignore[override]
        if self._store is None and (self.message is not None or not self._takes_stores()):
            super().receive_primitive(primitive)
            return
        try:
            self._receive(primitive)
        except _NotFast:
            held, self._held, self._command = self._held, [], bytearray()
            for earlier in held:
                super().receive_primitive(earlier)

    def _takes_stores(self) -> bool:
        return self.assoc.is_acceptor and getattr(self.assoc.ae, "pacs_store", None) is not None and available(self.assoc)

    def _receive(self, primitive: Any) -> None:
        values = primitive.presentation_data_value_list
        if self._store is None:
            self._held.append(primitive)
            for index, (context_id, data) in enumerate(values):
                header = data[0]
                if not header & 0x01:
                    raise _NotFast()  # a data set fragment first: pynetdicom's to judge
                self._command += data[1:]
                if header & 0x02:
                    try:
                        command = wire.parse_command(self._command)
                    except wire.WireError:
                        raise _NotFast() from None
                    if index == len(values) - 1 and self._is_plain_echo(command, context_id):
                        self._held, self._command = [], bytearray()
                        self.msg_queue.put((context_id, FastEcho(command, context_id)))
                        return
                    if self._is_find(command, context_id):
                        self._store = FastFind(command, context_id)
                    else:
                        self._store = self._start(command, context_id)
                    self._held, self._command = [], bytearray()
                    self._write(values[index + 1 :])
                    return
            return
        self._write(values)

    def _is_plain_echo(self, command: dict[str, Any], context_id: int) -> bool:
        """A C-ECHO-RQ (PS3.7 9.3.5.1) on a Verification context of an association whose
        EVT_C_ECHO has pynetdicom's default handler (which answers Success)."""
        if command.get("CommandField") != wire.C_ECHO_RQ or command.get("MessageID") is None:
            return False
        if command.get("CommandDataSetType", wire.NO_DATASET) != wire.NO_DATASET:
            return False
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or str(context.abstract_syntax) != VERIFICATION:
            return False
        handler = self.assoc.get_handlers(evt.EVT_C_ECHO)
        return bool(handler) and handler[0] is evt.get_default_handler(evt.EVT_C_ECHO)

    def _is_find(self, command: dict[str, Any], context_id: int) -> bool:
        """A C-FIND-RQ with an identifier (PS3.7 9.3.2.1) on a Query/Retrieve FIND context
        of its own SOP class, for an AE that answers them itself (``ae.pacs_find``)."""
        if command.get("CommandField") != wire.C_FIND_RQ or getattr(self.assoc.ae, "pacs_find", None) is None:
            return False
        if command.get("MessageID") is None or command.get("CommandDataSetType", wire.NO_DATASET) == wire.NO_DATASET:
            return False
        context = self.assoc._accepted_cx.get(context_id)
        sop_class = command.get("AffectedSOPClassUID") or ""
        return context is not None and sop_class in FIND_MODELS and str(context.abstract_syntax) == sop_class

    def _start(self, command: dict[str, Any], context_id: int) -> FastStore:
        """The receive file of a C-STORE-RQ taken here, its File Meta Information written."""
        context = self.assoc._accepted_cx.get(context_id)
        sop_class = command.get("AffectedSOPClassUID") or ""
        sop_instance = command.get("AffectedSOPInstanceUID") or ""
        if (
            command.get("CommandField") != wire.C_STORE_RQ
            or command.get("CommandDataSetType", wire.NO_DATASET) == wire.NO_DATASET
            or command.get("MessageID") is None
            or context is None
            or not (sop_class.isascii() and sop_instance.isascii() and sop_class and sop_instance)
            or not _is_storage(sop_class, self.assoc)
        ):
            raise _NotFast()
        meta = wire.file_meta(
            sop_class,
            sop_instance,
            str(context.transfer_syntax[0]),
            str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID),
            pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
        )
        store = FastStore(command, context_id, ReceiveFile(), getattr(self.assoc.ae, "pacs_writeback", None))
        store.write(b"\x00" * 128 + b"DICM" + meta)
        return store

    def _write(self, values: Any) -> None:
        store = self._store
        assert store is not None
        for context_id, data in values:
            header = data[0]
            if header & 0x01 or context_id != store.context_id:
                # A command fragment inside a data set, or another context: not a valid
                # message (PS3.8 E.2). The state machine aborts on Evt19, as pynetdicom does.
                self._store = None
                store.discard()
                log.error("a %s data set was interrupted by another message fragment", store.kind)
                self.dul.event_queue.put("Evt19")
                return
            store.write(memoryview(data)[1:])
            if header & 0x02:
                store.done()
                self._store = None
                self.msg_queue.put((context_id, store))
                return

    def send_msg(self, primitive: Any, context_id: int) -> None:  # type: ignore[override]
        command = self._fast_response(primitive) if available(self.assoc) else None
        if command is not None:
            try:
                send_message(self.assoc, context_id, command)
            except Interrupted as exc:  # the DUL was told (Evt17) and ends the association
                log.warning("%s response not sent: %s", type(primitive).__name__, exc)
            return
        super().send_msg(primitive, context_id)

    @staticmethod
    def _fast_response(primitive: Any) -> bytes | None:
        """The command set of a C-STORE or C-ECHO response ``wire`` can write, else None."""
        if primitive.MessageIDBeingRespondedTo is None or getattr(primitive, "Status", None) is None:
            return None
        if isinstance(primitive, C_STORE) and primitive.OffendingElement is None:
            return wire.c_store_rsp(
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
                primitive.MessageIDBeingRespondedTo,
                primitive.Status,
                comment=primitive.ErrorComment,
            )
        if isinstance(primitive, C_ECHO):
            return wire.c_echo_rsp(
                primitive.AffectedSOPClassUID,
                primitive.MessageIDBeingRespondedTo,
                primitive.Status,
                comment=primitive.ErrorComment,
            )
        return None


class PacsAssociation(pynetdicom_association.Association):
    """pynetdicom's Association, whose reactor waits on its message queue instead of sleeping
    (and, for an inline DUL, turns the DUL's reactor meanwhile: ``PacsDUL``)."""

    # Set on an association built before its connection came (archive.dimse.server's
    # standby): its thread waits for ``pacs_go`` before it starts serving.
    pacs_go: threading.Event | None = None
    pacs_cancelled = False
    # Called once from this association's thread when it is established and first waits
    # for its peer, or when it ends without that (the server's standby prepares another).
    pacs_on_idle: Any = None

    def __init__(self, ae: Any, mode: str) -> None:
        negotiations = getattr(ae, "pacs_negotiations", None)
        # The known answers' generation when this association took the AE's handlers.
        self.pacs_generation = negotiations.generation if negotiations is not None else 0
        super().__init__(ae, mode)
        self.acse = PacsACSE(self)

    def run(self) -> None:
        if self.pacs_go is not None:
            self.pacs_go.wait()
            if self.pacs_cancelled:
                if isinstance(self.dul, PacsDUL):
                    self.dul.close_wake()
                return
        try:
            super().run()
        finally:
            self.idle()

    def idle(self) -> None:
        """Call ``pacs_on_idle`` once."""
        callback, self.pacs_on_idle = self.pacs_on_idle, None
        if callback is not None:
            callback()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            dul = self.dul
            if isinstance(dul, PacsDUL) and dul.inline:
                dul.finish(_artim(self))

    def kill(self) -> None:
        """End the association (pynetdicom's ``kill``): with an inline DUL the owner's thread
        turns the reactor until the state machine is idle, instead of waiting for a DUL
        thread to get there; another thread waits for the owner to finish."""
        dul = self.dul
        if not (isinstance(dul, PacsDUL) and dul.inline):
            super().kill()
            return
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        if threading.get_ident() == dul.owner:
            dul.finish(_artim(self))
            return
        dul.wake()
        deadline = time.monotonic() + _artim(self) + 5.0
        while dul.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run_reactor(self) -> None:
        """The association loop (pynetdicom's ``_run_reactor``): serve each complete request
        as soon as it is decoded; look for release, abort and timeouts between requests."""
        self._is_paused = False
        wait = REQUESTOR_WAIT if self.is_requestor else ACCEPTOR_WAIT
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                # Paused again since the wait returned: a thread that saw _is_paused still
                # True is about to send a request, and its response is not ours to take.
                continue
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=wait)
            except queue.Empty:
                context_id, msg = None, None
            if isinstance(msg, FastStore):
                self._serve_store(msg)
            elif isinstance(msg, FastEcho):
                self._serve_echo(msg)
            elif isinstance(msg, FastFind):
                self._serve_find(msg)
            elif msg:
                self._serve_request(msg, int(context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


    def _serve_find(self, request: FastFind) -> None:
        """A C-FIND-RQ read by ``PacsDIMSE``: answered by ``ae.pacs_find`` (the archive's
        C-FIND SCP, PS3.4 C.4.1.3), as pynetdicom's ``_serve_request`` would call it."""
        if self._sent_release:
            log.warning("C-FIND request received during association release, ignored")
            return
        self.dimse.cancel_req = {}
        self._is_paused = True  # as pynetdicom, for a service that sends requests itself
        try:
            self.ae.pacs_find(self, request)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: a failing service aborts
            log.exception("C-FIND failed: %s", exc)
            self.abort()
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}

    def _serve_echo(self, request: FastEcho) -> None:
        """A C-ECHO-RQ read by ``PacsDIMSE``: answered with Success (PS3.4 A.4, PS3.7 9.3.5.2),
        as pynetdicom's Verification service with its default handler does."""
        if self._sent_release:
            log.warning("C-ECHO request received during association release, ignored")
            return
        sop_class = request.command.get("AffectedSOPClassUID") or VERIFICATION
        response = wire.c_echo_rsp(sop_class, request.command["MessageID"], 0x0000)
        try:
            send_message(self, request.context_id, response)
        except Interrupted as exc:
            log.warning("C-ECHO response not sent: %s", exc)

    def _serve_store(self, request: FastStore) -> None:
        """A C-STORE-RQ read by ``PacsDIMSE``: stored by ``ae.pacs_store`` (which returns a
        status code or a status dataset), answered with its C-STORE-RSP (PS3.7 9.3.1.2).
        What pynetdicom's ``_serve_request`` and Storage SCP do, without their objects."""
        command = request.command
        sop_class, sop_instance = command["AffectedSOPClassUID"], command["AffectedSOPInstanceUID"]
        path = request.path
        try:
            if self._sent_release:
                log.warning("C-STORE request received during association release, ignored")
                return
            self.dimse.cancel_req = {}
            self._is_paused = True
            try:
                result = self.ae.pacs_store(self, Path(path), sop_class, sop_instance, sha256=request.sha256)
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: a failing handler is 0xC211
                log.exception("C-STORE handler failed: %s", exc)
                result = 0xC211
            finally:
                self._is_paused = False
                self.dimse.cancel_req = {}
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)  # the handler took it, or it is not to be kept
        if not self.is_established:
            return
        if isinstance(result, int):
            code, comment = result, None
        else:
            code, comment = int(result.Status), (str(result.get("ErrorComment", "")) or None)
        response = wire.c_store_rsp(sop_class, sop_instance, command["MessageID"], code, comment=comment)
        try:
            send_message(self, request.context_id, response)
        except Interrupted as exc:
            log.warning("C-STORE response not sent: %s", exc)


# Notifications the replay of a negotiation does not give (it sends and encodes nothing).
REPLAY_UNSEEN_EVENTS = (evt.EVT_ACSE_SENT, evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)


def _copy_context(context: Any) -> Any:
    """A copy of a PresentationContext with its own list of transfer syntaxes (a quarter
    of ``copy.copy``'s time: a modality's request holds a hundred and more)."""
    copied = object.__new__(type(context))
    copied.__dict__.update(context.__dict__)
    copied._transfer_syntax = list(context._transfer_syntax)
    return copied


@dataclass(frozen=True)
class Outcome:
    """What pynetdicom's negotiation of one A-ASSOCIATE-RQ decided as acceptor
    (``ACSE._negotiate_as_acceptor``), read off the association it was negotiated on: the
    presentation contexts as negotiated, accepted and rejected (PS3.8 9.3.3.2), the
    acceptor's extended negotiation items (SCP/SCU role selection, asynchronous operations
    window, SOP class extended negotiation; PS3.7 D.3.3) and the SOP class common extended
    negotiation it accepted. Its objects are copies, only read from."""

    contexts: tuple[Any, ...]
    items: tuple[Any, ...]
    common_extended: tuple[tuple[Any, Any], ...]

    @classmethod
    def of(cls, assoc: Any) -> Outcome:
        negotiated = sorted([*assoc._accepted_cx.values(), *assoc._rejected_cx], key=lambda cx: cx.context_id)
        acceptor = assoc.acceptor
        return cls(
            tuple(_copy_context(cx) for cx in negotiated),
            tuple(item for items in acceptor._ext_neg.values() for item in items),
            tuple(acceptor._common_ext.items()),
        )

    def apply(self, assoc: Any) -> None:
        """Give ``assoc`` this outcome, as the negotiation leaves it on the association."""
        contexts = [_copy_context(cx) for cx in self.contexts]
        assoc._accepted_cx = {cx.context_id: cx for cx in contexts if cx.result == 0x00}
        assoc._rejected_cx = [cx for cx in contexts if cx.result != 0x00]
        for item in self.items:
            assoc.acceptor.add_negotiation_item(item)
        assoc.acceptor._common_ext = dict(self.common_extended)


def _copy_primitive(primitive: Any) -> Any:
    """A copy of an A-ASSOCIATE primitive with its own presentation contexts and lists (its
    user information items, only read from, are shared)."""
    copied = copy.copy(primitive)
    copied._presentation_context_definition_list = [
        _copy_context(cx) for cx in primitive._presentation_context_definition_list
    ]
    copied._presentation_context_definition_results_list = [
        _copy_context(cx) for cx in primitive._presentation_context_definition_results_list
    ]
    copied._user_information = list(primitive._user_information)
    return copied


class _KnownRequest:
    """A known request's decoded A-ASSOCIATE-RQ PDU as the state machine's AE-6 takes it:
    its A-ASSOCIATE indication primitive is a copy of the one built the first time, where
    ``to_primitive`` would build and check every presentation context again (0.2 ms for
    ``echoscu``'s one, 2-6 ms for the hundred and more a modality proposes)."""

    def __init__(self, pdu: Any, primitive: Any) -> None:
        self._pdu = pdu
        self._primitive = primitive

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pdu, name)

    def to_primitive(self) -> Any:
        return _copy_primitive(self._primitive)


@dataclass(frozen=True)
class Known:
    """A known answer: the A-ASSOCIATE-AC PDU's bytes, the request as pynetdicom decoded it
    (its PDU object, only read from), the negotiation that gave the answer (None: negotiate
    again, and check that the answer is the same) and the A-ASSOCIATE indication primitive
    the request gave (a pristine copy; None: ``to_primitive`` builds it again)."""

    answer: bytes
    decoded: Any
    outcome: Outcome | None
    primitive: Any = None

    def request(self) -> Any:
        """What the state machine takes as the received A-ASSOCIATE-RQ PDU."""
        return self.decoded if self.primitive is None else _KnownRequest(self.decoded, self.primitive)


class PacsACSE(pynetdicom_acse.ACSE):
    """pynetdicom's ACSE. An acceptor whose request was answered early (``Negotiations``)
    replays the negotiation that gave that answer instead of negotiating again: the
    association takes the presentation contexts and the negotiation items the peer was
    told, and the request that waits behind the A-ASSOCIATE-RQ is served at once."""

    def _negotiate_as_acceptor(self) -> None:
        dul = self.dul
        outcome = dul.replayable() if isinstance(dul, PacsDUL) else None
        if outcome is None:
            super()._negotiate_as_acceptor()
            return
        try:
            self._replay(outcome)
        except Exception:  # noqa: BLE001 - the peer holds an accept that cannot be kept
            log.exception("replaying a known negotiation failed; aborting the association")
            negotiations = getattr(self.assoc.ae, "pacs_negotiations", None)
            if negotiations is not None:
                negotiations.clear()
            dul._abort_hard()

    def _replay(self, outcome: Outcome) -> None:
        dul = self.dul
        assoc = self.assoc
        request = self.requestor.primitive
        self.requestor.ae_title = request.calling_ae_title
        outcome.apply(assoc)
        # The A-ASSOCIATE response primitive, as ``send_accept`` builds it (it was sent early).
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = assoc.accepted_contexts + assoc.rejected_contexts
        primitive.user_information = self.acceptor.user_information
        self.acceptor.primitive = primitive
        dul.accepted_early(primitive)
        evt.trigger(assoc, evt.EVT_ACCEPTED, {})
        assoc.is_established = True
        evt.trigger(assoc, evt.EVT_ESTABLISHED, {})


class Negotiations:
    """The A-ASSOCIATE-AC PDUs pynetdicom gave, by the A-ASSOCIATE-RQ PDU they answer,
    byte for byte (PS3.8 9.3.2, 9.3.3), with the request as pynetdicom decoded it (its PDU
    object is only read from: ``to_primitive`` builds new objects for each association).

    A modality or workstation asks for its associations with the same request every time;
    with the AE's configuration and negotiation handlers unchanged, pynetdicom's answer to
    the same bytes is the same. An inline association sends the known answer as soon as
    the request is read, then replays the negotiation that gave it (``PacsACSE``): it takes
    the presentation contexts and negotiation items the peer was just told, and its first
    request is served without waiting for a negotiation (half a millisecond of Python for
    one presentation context, more for a modality's hundred). Where the replay cannot be
    (a handler watches the answer being sent, or a known answer without its negotiation)
    the association negotiates as usual and checks that its answer is the one sent
    (``PacsDUL._send``; a difference aborts the association and empties this). The
    requestor has its answer without waiting for the request's decoding, the negotiation
    and the answer's encoding.

    Only an AE whose negotiation handlers (EVT_REQUESTED, user identity, extended
    negotiation, asynchronous operations) are pynetdicom's defaults answers early, and only
    while it is under its association limit; ``clear`` when the configuration changes.
    """

    NEGOTIATION_EVENTS = (evt.EVT_USER_ID, evt.EVT_SOP_EXTENDED, evt.EVT_SOP_COMMON, evt.EVT_ASYNC_OPS)

    # How long an association waits for another's negotiation of the same request (which
    # takes 5-10 ms for a modality's hundred presentation contexts) before it negotiates
    # itself; a negotiation older than this is no longer waited for.
    WAIT = 0.5

    def __init__(self, size: int = 256) -> None:
        self._answers: dict[bytes, Known] = {}
        self._lock = threading.Lock()
        self.size = size
        self.generation = 0  # counts clears: an association built before one keeps no answer
        self._defaults_of = -1  # the generation whose associations have the default handlers
        self._negotiating: dict[bytes, tuple[threading.Event, float]] = {}  # request -> (settled, since)

    def get(self, request: bytes) -> Known | None:
        """The known answer to a request's bytes, or None."""
        return self._answers.get(request)

    def wait_or_lead(self, request: bytes) -> Known | None:
        """For a request with no known answer: when another association of this process is
        negotiating these very bytes (a sender opening several associations at once), wait
        for its answer (at most ``WAIT``) and return it; else None, and the caller
        negotiates, then calls ``settle``. One negotiation instead of one per association."""
        now = time.monotonic()
        with self._lock:
            known = self._answers.get(request)
            if known is not None:
                return known
            negotiating = self._negotiating.get(request)
            if negotiating is None or now - negotiating[1] > self.WAIT:
                self._negotiating[request] = (threading.Event(), now)
                return None
        negotiating[0].wait(max(0.0, self.WAIT - (now - negotiating[1])))
        return self._answers.get(request)

    def settle(self, request: bytes) -> None:
        """``request`` has been answered (accepted or rejected): wake whoever waits for it."""
        with self._lock:
            negotiating = self._negotiating.pop(request, None)
        if negotiating is not None:
            negotiating[0].set()

    def put(self, request: bytes, answer: Known, generation: int) -> None:
        """Keep ``answer``, given by an association built at ``generation``."""
        with self._lock:
            if generation != self.generation:
                return  # its handlers may be those of before the last clear
            if request not in self._answers and len(self._answers) >= self.size:
                self._answers.pop(next(iter(self._answers)))  # the oldest
            self._answers[request] = answer

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self.generation += 1

    def may_answer(self, assoc: Any) -> bool:
        """Whether ``assoc`` would be answered the same as before: default negotiation
        handlers, and the AE under its association limit (as pynetdicom counts it)."""
        if not self._default_handlers(assoc):
            return False
        ae = assoc.ae
        if threading.active_count() <= ae.maximum_associations:
            return True  # fewer threads than the limit: fewer associations too, no need to count
        return len([a for a in ae.active_associations if a.is_acceptor]) <= ae.maximum_associations

    def _default_handlers(self, assoc: Any) -> bool:
        """Whether ``assoc``'s negotiation handlers are pynetdicom's defaults; known once per
        generation for the associations built in it (a change of handlers clears)."""
        generation = getattr(assoc, "pacs_generation", None)
        if generation is not None and generation == self.generation and self._defaults_of == generation:
            return True
        if assoc.get_handlers(evt.EVT_REQUESTED):
            return False
        for event in self.NEGOTIATION_EVENTS:
            handler = assoc.get_handlers(event)
            if not handler or handler[0] is not evt.get_default_handler(event):
                return False
        if generation is not None and generation == self.generation:
            self._defaults_of = generation
        return True


def _artim(assoc: Any) -> float:
    """How long an inline DUL may take to close down: the ARTIM timeout (PS3.8 9.1.5)."""
    return float(assoc.dul.artim_timer.timeout or 30)


def poll(assoc: Any) -> None:
    """On an inline association, in its own thread: act on what the peer has sent meanwhile
    (a C-CANCEL during a C-FIND or C-MOVE, an abort), without waiting."""
    dul = getattr(assoc, "dul", None)
    if isinstance(dul, PacsDUL) and dul.inline and threading.get_ident() == dul.owner and not dul.lent:
        while dul.pump(0.0):
            pass


_STORAGE: dict[str, bool] = {}


def _is_storage(sop_class_uid: str, assoc: Any) -> bool:
    """Whether pynetdicom would serve a C-STORE of this SOP class with its Storage service
    class (as ``_serve_request`` chooses it)."""
    from pynetdicom import _config
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    if _config.UNRESTRICTED_STORAGE_SERVICE or sop_class_uid in assoc.acceptor.accepted_common_extended:
        return False
    found = _STORAGE.get(sop_class_uid)
    if found is None:
        found = uid_to_service_class(sop_class_uid) is StorageServiceClass
        _STORAGE[sop_class_uid] = found
    return found


class ReceiveFile(io.FileIO):
    """The file a C-STORE data set is received into (``STORE_RECV_CHUNKED_DATASET``), in
    place of ``tempfile.NamedTemporaryFile``: a plain unbuffered file with a random name
    in ``tempfile.tempdir`` (the SCP's receive directory). NamedTemporaryFile's wrapper and
    name generation cost a quarter of a millisecond per instance."""

    def __init__(self, delete: bool = False, mode: str = "wb", suffix: str = ".dcm") -> None:
        super().__init__(os.path.join(tempfile.gettempdir(), f"{uuid.uuid4().hex}{suffix}"), "xb")

    @property
    def file(self) -> "ReceiveFile":  # pynetdicom calls ``.file.flush()``: nothing to flush
        return self


def install() -> None:
    """Make pynetdicom build every association (acceptor and requestor) from
    ``PacsAssociation`` with a ``PacsDUL``, and receive data sets into ``ReceiveFile``s."""
    if not pynetdicom.__version__.startswith("3."):
        raise RuntimeError(f"archive.dimse.fastpath is written for pynetdicom 3, not {pynetdicom.__version__}")
    from pynetdicom import ae as pynetdicom_ae
    from pynetdicom import dimse_messages

    dimse_messages.NamedTemporaryFile = ReceiveFile

    pynetdicom_association.DULServiceProvider = PacsDUL  # built by Association.__init__
    pynetdicom_association.DIMSEServiceProvider = PacsDIMSE
    pynetdicom_ae.Association = PacsAssociation  # requestors (AE.associate)
    pynetdicom_association.Association = PacsAssociation  # acceptors (transport imports it per request)


def _dul(assoc: Any) -> PacsDUL:
    dul = getattr(assoc, "dul", None)
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if not isinstance(dul, PacsDUL) or raw is None or isinstance(raw, ssl.SSLSocket):
        raise FastPathUnavailable("this association has no fast path")
    return dul


def available(assoc: Any) -> bool:
    """True when messages on ``assoc`` can go the fast way."""
    try:
        _dul(assoc)
    except FastPathUnavailable:
        return False
    return True


def peer_maximum_length(assoc: Any) -> int:
    """The peer's Maximum Length Received (PS3.8 D.1), 0 for no limit."""
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return int(peer.maximum_length or 0)


def _sendmsg_all(sock: socket.socket, buffers: Sequence[Any]) -> None:
    """Write every byte of ``buffers``, a call of ``sendmsg`` per up to 1,000 of them.

    Many small buffers (C-FIND answers: a few headers and an identifier each) are joined
    into one first: the kernel takes one buffer of 10 KB in well under half the time it
    takes 100 pieces of it; large ones (data sets) go as they are, uncopied."""
    if len(buffers) > 2 and sum(memoryview(b).nbytes for b in buffers) <= _JOIN_BYTES:
        sock.sendall(b"".join(buffers))
        return
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch = pending[:_MAX_BUFFERS]
        sent = sock.sendmsg(batch)
        # Drop what went out; a partly sent buffer keeps its tail.
        index = 0
        while index < len(batch) and sent >= batch[index].nbytes:
            sent -= batch[index].nbytes
            index += 1
        if index < len(batch) and sent:
            batch[index] = batch[index][sent:]
        pending = batch[index:] + pending[len(batch) :]


def _drain_outgoing(dul: PacsDUL, timeout: float) -> None:
    """Wait until the DUL has sent every PDU queued before us (message order, PS3.8 9.3.5)."""
    if dul.inline and threading.get_ident() == dul.owner:
        dul.flush()
        if dul.to_provider_queue.qsize():
            raise Interrupted("the association's queued PDUs were not sent")
        return
    deadline = time.monotonic() + timeout
    while not dul.to_provider_queue.empty():
        if time.monotonic() > deadline or not dul.is_alive():
            raise Interrupted("the association's queued PDUs were not sent")
        time.sleep(0.0001)


def write(assoc: Any, buffers: Sequence[Any]) -> None:
    """Write ready-made PDUs (``wire.pdus``) onto the association, after anything queued.

    The DUL keeps reading the socket meanwhile (a C-CANCEL is seen). Raises ``Interrupted``
    when the connection fails (the DUL is told, as if it had failed to send).
    """
    dul = _dul(assoc)
    _drain_outgoing(dul, timeout=float(assoc.dimse_timeout or 30))
    _send_locked(dul, buffers)


def _send_locked(dul: PacsDUL, buffers: Sequence[Any]) -> None:
    """Write ``buffers`` under the DUL's I/O lock; a failure tells the DUL the transport
    closed (Evt17) and raises ``Interrupted``."""
    with dul.io_lock:
        try:
            _sendmsg_all(dul.socket.socket, buffers)  # type: ignore[union-attr]
        except OSError as exc:
            dul.event_queue.put("Evt17")  # transport connection closed
            dul.wake()
            raise Interrupted(f"cannot send to the peer: {exc}") from exc


def send_message(assoc: Any, context_id: int, command: bytes, dataset: Any | None = None) -> None:
    """Write one DIMSE message (command set bytes, data set buffer or None) onto ``assoc``."""
    write(assoc, wire.pdus(context_id, command, dataset, peer_maximum_length(assoc)))


class Borrowed:
    """An association's socket, lent to one thread for request/response exchanges."""

    def __init__(self, assoc: Any, dul: PacsDUL) -> None:
        self.assoc = assoc
        self.dul = dul
        self.sock: socket.socket = dul.socket.socket  # type: ignore[union-attr]
        self.maximum_length = peer_maximum_length(assoc)
        self.timeout = assoc.dimse_timeout

    def send(self, context_id: int, command: bytes, dataset: Any | None = None) -> None:
        _send_locked(self.dul, wire.pdus(context_id, command, dataset, self.maximum_length))

    def _read(self, count: int) -> bytearray:
        data = _recv_exactly(self.sock, count)
        if len(data) < count:
            raise Interrupted("the peer closed the connection")
        return data

    def receive(self) -> tuple[int, dict[str, Any], bytes | None]:
        """Read the peer's next DIMSE message: (context ID, command, data set bytes or None).

        A C-CANCEL-RQ on the way is recorded where pynetdicom keeps them (the service's
        ``is_cancelled`` sees it) and reading goes on. Raises ``Interrupted`` for anything
        but P-DATA-TF (handed to the DUL), or when nothing comes within the DIMSE timeout.
        """
        command = bytearray()
        dataset: bytearray | None = None
        parsed: dict[str, Any] | None = None
        previous = self.sock.gettimeout()
        self.sock.settimeout(self.timeout)
        try:
            while True:
                head = self._read(6)
                pdu_type, _, length = wire.PDU_HEADER.unpack(head)
                body = self._read(length)
                self.dul._idle_timer.restart()
                if pdu_type != wire.P_DATA_TF:
                    self.dul.deliver(head + body)
                    raise Interrupted(f"the peer sent PDU type 0x{pdu_type:02X} instead of a response")
                for context_id, header, value in wire.iter_pdvs(body):
                    if header & 0x01:
                        command += value
                        if header & 0x02:
                            parsed = wire.parse_command(command)
                            if parsed.get("CommandDataSetType", wire.NO_DATASET) != wire.NO_DATASET:
                                dataset = bytearray()
                                continue
                    elif dataset is not None:
                        dataset += value
                        if not header & 0x02:
                            continue
                    else:
                        raise Interrupted("the peer sent a data set fragment before its command")
                    if parsed is None:
                        continue
                    if parsed.get("CommandField") == wire.C_CANCEL_RQ:
                        self._record_cancel(parsed)
                        command, dataset, parsed = bytearray(), None, None
                        continue
                    return context_id, parsed, None if dataset is None else bytes(dataset)
        except (TimeoutError, socket.timeout) as exc:
            raise Interrupted("no response from the peer within the DIMSE timeout") from exc
        except wire.WireError as exc:
            self.dul.event_queue.put("Evt19")  # invalid PDU: the state machine aborts
            raise Interrupted(str(exc)) from exc
        except OSError as exc:
            if isinstance(exc, Interrupted):
                raise
            self.dul.event_queue.put("Evt17")
            raise Interrupted(f"the connection failed: {exc}") from exc
        finally:
            try:
                self.sock.settimeout(previous)
            except OSError:
                pass

    def _record_cancel(self, parsed: dict[str, Any]) -> None:
        from pynetdicom.dimse_primitives import C_CANCEL

        cancels = self.assoc.dimse.cancel_req
        if len(cancels) < 10:
            cancel = C_CANCEL()
            cancel.MessageIDBeingRespondedTo = parsed.get("MessageIDBeingRespondedTo")
            cancels[int(parsed.get("MessageIDBeingRespondedTo") or 0)] = cancel


@contextlib.contextmanager
def borrowed(assoc: Any) -> Iterator[Borrowed]:
    """Lend ``assoc``'s socket to this thread (see the module's docstring).

    The association's reactor is paused (it would take messages meant for us), everything
    queued for the DUL goes out first, then the DUL stops reading until the block ends.
    Raises ``FastPathUnavailable`` for an association without the fast path.
    """
    dul = _dul(assoc)
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused and assoc.is_established:
            time.sleep(0.0001)
        _drain_outgoing(dul, timeout=float(assoc.dimse_timeout or 30))
        with dul.io_lock:
            dul.lent = True
        try:
            yield Borrowed(assoc, dul)
        finally:
            with dul.io_lock:
                dul.lent = False
            dul.wake()
    finally:
        assoc._reactor_checkpoint.set()


def c_store(channel: Borrowed, context_id: int, command: bytes, dataset: Any, message_id: int) -> dict[str, Any]:
    """One C-STORE exchange on a borrowed socket: send the request, return the response's
    command (PS3.7 9.3.1.2). Raises ``Interrupted`` when no fitting response comes."""
    channel.send(context_id, command, dataset)
    _, response, _ = channel.receive()
    if response.get("CommandField") != wire.C_STORE_RSP or response.get("MessageIDBeingRespondedTo") != message_id:
        raise Interrupted("the peer's answer is not the C-STORE response to our request")
    return response


def status_of(response: dict[str, Any]) -> int | None:
    """The Status of a response command, or None."""
    value = response.get("Status")
    return int(value) if value is not None else None

