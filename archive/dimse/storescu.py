"""C-STORE as an SCU over an established association (PS3.4 Annex B; the sub-operations
of C-MOVE and C-GET, PS3.4 C.4.2.3 and C.4.3.3, and sends to DICOM nodes).

``Sender`` sends stored instances one after the other. A file whose transfer syntax the
peer accepted goes as stored: its data set is mapped and written to the socket without
being decoded or copied. Otherwise the instance is transcoded and encoded in the context's
syntax. ``retrieve.outgoing`` makes that choice. On an association built with the fast path
(``archive.dimse.fastpath``) the socket is borrowed for the whole run, so each exchange is
one ``sendmsg`` and a read of the response; elsewhere (TLS) each goes through pynetdicom's
``send_c_store``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from archive import retrieve
from archive.dimse import fastpath, wire

log = logging.getLogger("archive.dimse")


class Sender:
    """Sends C-STORE requests on ``assoc``; use as a context manager around a run of them."""

    def __init__(self, assoc: Any, *, originator_aet: str | None = None, originator_id: int | None = None) -> None:
        self.assoc = assoc
        self.originator_aet = originator_aet
        self.originator_id = originator_id
        self._stack = contextlib.ExitStack()
        self._channel: fastpath.Borrowed | None = None
        self.broken = False
        self._accepted: dict[str, list[str]] = {}
        self._contexts: dict[tuple[str, str, bool], Any] = {}

    def __enter__(self) -> "Sender":
        if fastpath.available(self.assoc):
            self._channel = self._stack.enter_context(fastpath.borrowed(self.assoc))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()
        self._channel = None

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        """The transfer syntaxes the peer accepted for ``sop_class_uid`` (with us as SCU),
        found once per SOP class."""
        found = self._accepted.get(sop_class_uid)
        if found is None:
            found = [
                str(cx.transfer_syntax[0])
                for cx in self.assoc.accepted_contexts
                if str(cx.abstract_syntax) == sop_class_uid and _we_may_send(self.assoc, cx)
            ]
            self._accepted[sop_class_uid] = found
        return found

    def store(self, item: retrieve.StoredInstance, message_id: int) -> int | None:
        """C-STORE one instance; return the peer's Status, or None when it was not sent
        (unreadable file, no fitting context, a broken association: the log says why)."""
        if self.broken:
            return None
        try:
            outgoing = retrieve.outgoing(item, self.accepted_syntaxes(item.sop_class_uid))
            if self._channel is None:
                reply = self.assoc.send_c_store(
                    outgoing, msg_id=message_id, originator_aet=self.originator_aet, originator_id=self.originator_id
                )
                return int(reply.Status) if "Status" in reply else None
            return self._store_fast(item, outgoing, message_id)
        except (retrieve.RetrieveError, wire.WireError, OSError, ValueError, AttributeError, RuntimeError, BufferError) as exc:
            log.warning("C-STORE of %s to %s failed: %s", item.sop_instance_uid, _peer_ae(self.assoc), exc)
            if isinstance(exc, fastpath.Interrupted):
                self._give_up()
            return None

    def _context(self, sop_class_uid: str, syntax: str, allow_conversion: bool) -> Any:
        key = (sop_class_uid, syntax, allow_conversion)
        context = self._contexts.get(key)
        if context is None:
            context = self.assoc._get_valid_context(sop_class_uid, syntax, "scu", allow_conversion=allow_conversion)
            self._contexts[key] = context
        return context

    def _store_fast(self, item: retrieve.StoredInstance, outgoing: Path | Dataset, message_id: int) -> int | None:
        """The file as stored (a map of it, never decoded) or the transcoded data set encoded
        in the context's syntax, on the borrowed socket."""
        assert self._channel is not None
        command = wire.c_store_rq(
            item.sop_class_uid,
            item.sop_instance_uid,
            message_id,
            originator_aet=self.originator_aet,
            originator_message_id=self.originator_id,
        )
        if isinstance(outgoing, Path):
            context = self._context(item.sop_class_uid, item.transfer_syntax_uid, allow_conversion=False)
            with open(outgoing, "rb") as handle:
                view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            data = memoryview(view)
            try:
                response = fastpath.c_store(
                    self._channel, int(context.context_id), command, data[wire.dataset_offset(data) :], message_id
                )
            finally:
                _close_quietly(data, view)
        else:
            context = self._context(item.sop_class_uid, str(outgoing.file_meta.TransferSyntaxUID), allow_conversion=True)
            syntax = context.transfer_syntax[0]
            encoded = encode(outgoing, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            if encoded is None:
                raise retrieve.RetrieveError(f"cannot encode {item.sop_instance_uid} as {syntax.name}")
            response = fastpath.c_store(self._channel, int(context.context_id), command, encoded, message_id)
        return fastpath.status_of(response)

    def _give_up(self) -> None:
        """The association is unusable: give the socket back and abort it."""
        self.broken = True
        self._stack.close()
        self._channel = None
        if self.assoc.is_established:
            self.assoc.abort()


def _close_quietly(data: memoryview, view: mmap.mmap) -> None:
    """Unmap a sent file. After a failed send, the traceback may still hold slices of the
    map; it is then unmapped when the last of them goes, instead of raising here."""
    try:
        data.release()
        view.close()
    except BufferError:
        pass


def _we_may_send(assoc: Any, context: Any) -> bool:
    """Whether we may act as the Storage SCU on an accepted ``context`` (PS3.7 D.3.3.4:
    as the acceptor, for C-GET, only where the requestor took the SCP role). pynetdicom
    sets ``as_scu`` to our own side's role once negotiation is done."""
    return context.as_scu is True


def _peer_ae(assoc: Any) -> str:
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(peer.ae_title).strip()
