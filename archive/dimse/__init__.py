"""The DICOM upper-layer edge: pynetdicom handlers that decode a request, call an archive
service and map its outcome to a named PS3.4 status. No archive logic lives here."""

from archive.dimse import fastpath

fastpath.install()  # every association pynetdicom builds from here on takes the fast path
