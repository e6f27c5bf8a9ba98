"""OHIF, the radiologist's viewer, served on 127.0.0.1 against an Orthanc.

The npm package ``@ohif/app`` ships a prebuilt ``dist/``; ``scripts/setup.sh`` unpacks
it into ``.cache/ohif-<version>/`` (ignored by git). :class:`OhifServer` serves that
folder as a single-page application and forwards ``/dicom-web/...`` to Orthanc's
DICOMweb, so the viewer and its data share one origin (no CORS), with an
``app-config.js`` of our own: one DICOMweb data source, no investigational-use
dialog, nothing fetched from outside.
"""

from __future__ import annotations

import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.orthanc import DICOMWEB_ROOT, Orthanc

OHIF_VERSION = "3.13.2"
DIST = Path(__file__).resolve().parents[2] / ".cache" / f"ohif-{OHIF_VERSION}" / "package" / "dist"
#: Request headers passed on to Orthanc (the rest, cookies included, stay here);
#: Host, so that the links Orthanc writes into metadata point back at this proxy.
_FORWARDED = ("accept", "range", "content-type", "host")

APP_CONFIG = f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: {{ option: 'never' }},
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc (same-origin proxy)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '{DICOMWEB_ROOT}',
        qidoRoot: window.location.origin + '{DICOMWEB_ROOT}',
        wadoRoot: window.location.origin + '{DICOMWEB_ROOT}',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
}};
"""


def installed() -> bool:
    return (DIST / "index.html").is_file()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Requests are not logged: the page makes hundreds."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/"):
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "application/javascript", APP_CONFIG.encode())
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        file = (DIST / path.lstrip("/")).resolve()
        if not file.is_relative_to(DIST) or not file.is_file():
            file = DIST / "index.html"  # a route of the single-page application
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(200, kind, file.read_bytes())

    def _forward(self) -> None:
        orthanc = self.server.orthanc
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED}
        status, answer, body = orthanc.request("GET", self.path, headers=headers)
        self._send(status, answer.get("content-type", "application/octet-stream"), body)

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the page opens many connections at once

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        super().__init__(("127.0.0.1", 0), _Handler)


class OhifServer:
    """OHIF and a same-origin proxy of ``orthanc``'s DICOMweb on a free loopback port."""

    def __init__(self, orthanc: Orthanc) -> None:
        if not installed():
            pytest.fail(f"OHIF {OHIF_VERSION} is missing from {DIST.parent}: run scripts/setup.sh")
        mimetypes.add_type("application/wasm", ".wasm")
        mimetypes.add_type("application/javascript", ".js")
        self._server = _Server(orthanc)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def viewer_url(self, study_uid: str, series_uid: str | None = None) -> str:
        """The study in OHIF's viewer; with ``series_uid``, opened on that series (as
        a worklist link to a report would open it)."""
        first = f"&initialSeriesInstanceUID={series_uid}" if series_uid else ""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}{first}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
