"""C-ECHO as an SCU: check that a remote DICOM node answers (PS3.4 Annex A, the Verification
Service Class; the C-ECHO service is PS3.7 9.1.5).

``verify()`` is what the admin's "Verify with C-ECHO" action and ``remotenode echo`` call. It
turns every way an echo can fail into one sentence instead of an exception.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from archive.dimse.server import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# C-ECHO response statuses (PS3.7 9.1.5.1.4 and Annex C).
ECHO_STATUSES = {
    0x0000: "Success",
    0x0122: "Refused: SOP Class not supported",
    0x0210: "Refused: duplicate invocation",
    0x0211: "Refused: unrecognized operation",
    0x0212: "Refused: mistyped argument",
}


class _ConnectErrors(logging.Handler):
    """Collects pynetdicom's "TCP Initialisation Error: ..." log lines with their thread.

    pynetdicom logs why a connection failed (refused, timed out, no route) but does not
    report it to the caller; the association's own thread is known once it has ended.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[tuple[int | None, str]] = []
        self._lock_errors = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error: "):
            with self._lock_errors:
                detail = re.sub(r"^\[Errno -?\d+\] ", "", message.removeprefix("TCP Initialisation Error: "))
                self.errors.append((record.thread, detail))

    def last_for(self, thread_id: int | None) -> str:
        with self._lock_errors:
            found = [message for ident, message in self.errors if ident == thread_id]
        return found[-1] if found else ""


def verify(ae_title: str, host: str, port: int, calling_ae: str, timeout: float = 10) -> tuple[bool, str]:
    """Send a C-ECHO to ``ae_title`` at ``host:port`` as ``calling_ae`` (PS3.4 Annex A).

    Associates proposing only the Verification SOP Class, sends one C-ECHO, releases.
    ``timeout`` (seconds) bounds the connection, the association negotiation (ACSE) and the
    wait for the response (DIMSE, network).

    Returns ``(True, "C-ECHO succeeded in N ms")``, N timing the association request up to
    the C-ECHO response, or ``(False, reason)``: the host cannot be resolved or connected
    to, the association was rejected (with the result, source and reason of PS3.8 9.3.4),
    aborted or not answered, or the C-ECHO status was not Success. Never raises for network
    problems or invalid AE titles.
    """
    called = ae_title.strip()
    where = f"{called}@{host}:{port}"
    ae = AE(ae_title=calling_ae.strip())
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    connected = threading.Event()
    errors = _ConnectErrors()
    transport_log = logging.getLogger("pynetdicom.transport")
    transport_log.addHandler(errors)
    started = time.monotonic()
    try:
        assoc = ae.associate(
            host, port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())]
        )
    except OSError as exc:  # the host name does not resolve, or no socket
        return False, f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    except ValueError as exc:  # an AE title pynetdicom refuses to send
        return False, f"cannot request an association with {where}: {exc}"
    finally:
        transport_log.removeHandler(errors)

    try:
        if not assoc.is_established:
            return False, _why_not_established(assoc, where, host, port, connected, errors, time.monotonic() - started, timeout)
        try:
            response = assoc.send_c_echo()
        except (RuntimeError, ValueError) as exc:  # no usable presentation context
            return False, f"cannot send a C-ECHO to {where}: {exc}"
        elapsed_ms = (time.monotonic() - started) * 1000
        if "Status" not in response:
            if assoc.is_aborted:
                return False, f"the association with {where} was aborted during the C-ECHO"
            return False, f"no valid C-ECHO response from {where} within {timeout:g} s"
        code = int(response.Status)
        if code != 0x0000:
            name = ECHO_STATUSES.get(code, "unknown status")
            comment = f": {response.ErrorComment}" if "ErrorComment" in response else ""
            return False, f"C-ECHO status 0x{code:04X} ({name}) from {where}{comment}"
        return True, f"C-ECHO succeeded in {elapsed_ms:.0f} ms"
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not_established(
    assoc: Association,
    where: str,
    host: str,
    port: int,
    connected: threading.Event,
    errors: _ConnectErrors,
    elapsed: float,
    timeout: float,
) -> str:
    """Say why an association request failed, in one sentence."""
    if not connected.is_set():
        detail = errors.last_for(getattr(assoc.dul, "ident", None))
        if not detail:
            detail = "timed out" if elapsed >= timeout else "connection refused or unreachable"
        return f"cannot connect to {host}:{port}: {detail}"
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        return (
            f"association rejected by {where}: {answer.reason_str} "
            f"({answer.result_str}, source: {answer.source_str})"
        )
    if answer is not None and answer.result == 0x00:
        return f"{where} accepted the association but not the Verification SOP Class"
    if elapsed >= timeout:
        return f"no answer to the association request from {where} within {timeout:g} s"
    return f"the association request to {where} was aborted"
