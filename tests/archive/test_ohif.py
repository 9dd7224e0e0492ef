"""The requests OHIF v3 makes with the DICOMweb data source of docs/ohif.md, replayed in
Debian's Chromium from a page on another origin (CORS preflights included)."""

from __future__ import annotations

import http.server
import os
import threading

import numpy as np
import pytest
from pydicom.uid import generate_uid

from archive.ingest import Source, ingest_bytes
from tests.conftest import free_port, make_dataset, make_user, part10
from tests.viewer.test_browser import browser  # noqa: F401 - the Chromium fixture

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
PASSWORD = "ohif reader passphrase"

REPLAY = """
async ([base, auth, study, series, sop]) => {
  const headers = (accept) => ({ Authorization: 'Basic ' + btoa(auth), Accept: accept });
  const out = {};
  const get = async (name, url, accept) => {
    const response = await fetch(base + url, { headers: headers(accept), mode: 'cors' });
    const body = new Uint8Array(await response.arrayBuffer());
    out[name] = { status: response.status, type: response.headers.get('Content-Type') || '', length: body.length,
                  text: new TextDecoder('latin1').decode(body.slice(0, 20000)), bytes: Array.from(body) };
  };
  await get('studies', '/studies?limit=101&offset=0&fuzzymatching=true&includefield=00081030%2C00080060', 'application/dicom+json');
  await get('study', `/studies?StudyInstanceUID=${study}&includefield=00081030%2C00080060`, 'application/dicom+json');
  await get('series', `/studies/${study}/series?includefield=0008103E%2C00080021`, 'application/dicom+json');
  await get('metadata', `/studies/${study}/series/${series}/metadata`, 'application/dicom+json');
  await get('frames', `/studies/${study}/series/${series}/instances/${sop}/frames/1`,
            'multipart/related; type=application/octet-stream; transfer-syntax=*');
  await get('thumbnail', `/studies/${study}/series/${series}/instances/${sop}/rendered`, 'image/jpeg');
  for (const value of Object.values(out)) { if (value.type.startsWith('application/dicom+json')) value.bytes = []; }
  return out;
}
"""


@pytest.fixture
def other_origin():
    """An empty page served from another port: another origin than the live server."""
    port = free_port()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>OHIF stand-in</title>")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def test_ohif_requests_succeed_from_another_origin(browser, live_server, transactional_db, settings, other_origin) -> None:  # noqa: F811
    settings.CORS_ALLOWED_ORIGINS = [other_origin]
    make_user("ohif", "Clinician", "Radiologist", password=PASSWORD)
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=n, rows=16, columns=16) for n in (1, 2)]
    for ds in datasets:
        assert ingest_bytes(part10(ds), Source(channel="test")).ok
    page = browser.new_page()
    page.goto(other_origin)
    results = page.evaluate(REPLAY, [f"{live_server.url}/dicom-web", f"ohif:{PASSWORD}", study, series, datasets[0].SOPInstanceUID])
    page.close()
    for name, result in results.items():
        assert result["status"] == 200, (name, result["status"], result["text"][:200])
    assert results["studies"]["type"].startswith("application/dicom+json") and study in results["studies"]["text"]
    assert series in results["series"]["text"]
    assert results["metadata"]["text"].count(datasets[0].SOPInstanceUID) == 1
    assert results["frames"]["type"].startswith("multipart/related")
    assert results["thumbnail"]["type"] == "image/jpeg"
    # the frame part holds the stored values, little endian
    body = bytes(results["frames"]["bytes"])
    start = body.index(b"\r\n\r\n") + 4
    pixels = np.frombuffer(body[start : start + 16 * 16 * 2], dtype="<u2").reshape(16, 16)
    assert np.array_equal(pixels, datasets[0].pixel_array)
