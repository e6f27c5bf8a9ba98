"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the tests: the
archive with DICOMweb that a hospital's viewer reads from.

Each :class:`Orthanc` has its own configuration, storage and log under a folder of
the test, and free ports; it is not the system service. It answers HTTP only to
loopback clients (``RemoteAccessAllowed`` false; Orthanc 1.10 has no bind-address
setting) and accepts C-STORE only from the AE titles it is given, and only from
127.0.0.1 (``DicomCheckModalityHost``). With ``users`` it wants HTTP basic
authentication (the helpers here log in as the first user).

    archive = Orthanc.start(tmp_path / "orthanc", callers=["SONOCASE"])
    archive.store(paths)                     # REST upload, as a PACS import would
    archive.instances(study_uid)             # QIDO-RS: what a viewer would list
    archive.file(sop_instance_uid)           # the stored Part 10 file
    archive.stop()

``orthanc`` is the fixture: one archive per test, no authentication.

Reused by every test that needs a DICOMweb peer (STOW-RS, QIDO-RS, WADO-RS).
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.common import free_port, wait_for

#: Where Debian installs the server and its DICOMweb plugin.
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The DICOMweb root, as the plugin serves it.
DICOMWEB_ROOT = "/dicom-web"


def installed() -> bool:
    return ORTHANC.is_file() and DICOMWEB_PLUGIN.exists()


def configuration(
    folder: Path, http_port: int, dicom_port: int, aet: str, callers: Iterable[str], users: dict[str, str] | None = None
) -> dict[str, Any]:
    """Orthanc's JSON configuration: own storage, loopback, DICOMweb on; basic
    authentication for ``users`` (name: password) when given."""
    return {
        "Name": f"sonocase-test-{aet}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "HttpThreadsCount": 8,
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {
            caller.lower(): {"AET": caller, "Host": "127.0.0.1", "Port": 104, "AllowEcho": True, "AllowStore": True}
            for caller in callers
        },
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "StorageAccessOnFind": "Always",
        # No "Host": links in metadata (BulkDataURI) name the host the request was
        # made to, so a same-origin proxy that passes its Host on gets links to itself.
        "DicomWeb": {"Enable": True, "Root": f"{DICOMWEB_ROOT}/", "EnableWado": False},
    }


@dataclass
class Orthanc:
    """One running Orthanc; see the module doc."""

    folder: Path
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]
    log: Path
    users: dict[str, str] | None = None

    @classmethod
    def start(
        cls, folder: Path, aet: str = "ORTHANC", callers: Sequence[str] = (), users: dict[str, str] | None = None
    ) -> Orthanc:
        """Write a configuration under ``folder``, start Orthanc and wait until it answers."""
        if not installed():
            pytest.fail(
                "Orthanc or its DICOMweb plugin is missing: run scripts/setup.sh "
                "(apt-get install orthanc orthanc-dicomweb)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        config = folder / "orthanc.json"
        config.write_text(json.dumps(configuration(folder, http_port, dicom_port, aet, callers, users), indent=2))
        log = folder / "orthanc.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(ORTHANC), f"--logfile={log}", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        archive = cls(folder, http_port, dicom_port, aet, process, log, users)

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"Orthanc exited with {process.returncode}:\n{archive.log_tail()}")
            try:
                return archive.get_json("/plugins").count("dicom-web") == 1
            except OSError:
                return False

        try:
            wait_for("Orthanc to answer with its DICOMweb plugin", answers, timeout=60, interval=0.1)
        except BaseException:
            archive.stop()
            raise
        return archive

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT

    @property
    def destination(self) -> str:
        """This archive as a Sonocase destination (``AET@host:port``)."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to Orthanc; status, headers and body."""
        headers = dict(headers or {})
        if self.users:
            login = ":".join(next(iter(self.users.items()))).encode()
            headers["Authorization"] = "Basic " + base64.b64encode(login).decode()
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, _, body = self.request("GET", path, headers={"Accept": "application/json"})
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status} {body[:500]!r}")
        return json.loads(body)

    def store(self, paths: Iterable[Path]) -> list[str]:
        """Upload DICOM files through the REST API (as an archive import would);
        returns their SOP Instance UIDs as Orthanc read them."""
        uids = []
        for path in paths:
            status, _, body = self.request(
                "POST", "/instances", path.read_bytes(), {"Content-Type": "application/dicom"}
            )
            if status != 200:
                raise AssertionError(f"Orthanc refused {path.name}: HTTP {status} {body[:500]!r}")
            tags = self.get_json(f"/instances/{json.loads(body)['ID']}/simplified-tags")
            uids.append(tags["SOPInstanceUID"])
        return uids

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the study's instances as DICOM JSON (empty list when none)."""
        status, _, body = self.request(
            "GET", f"{DICOMWEB_ROOT}/studies/{study_uid}/instances", headers={"Accept": "application/dicom+json"}
        )
        if status == 204 or (status == 200 and not body.strip()):
            return []
        if status != 200:
            raise AssertionError(f"QIDO-RS for study {study_uid}: HTTP {status} {body[:500]!r}")
        return list(json.loads(body))

    def sop_classes(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of every instance of the study."""
        return {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in self.instances(study_uid)}

    def file(self, sop_instance_uid: str) -> bytes:
        """The Part 10 file Orthanc holds for an instance."""
        (found,) = [
            item
            for item in json.loads(self.request("POST", "/tools/lookup", sop_instance_uid.encode())[2])
            if item["Type"] == "Instance"
        ]
        status, _, body = self.request("GET", f"/instances/{found['ID']}/file")
        if status != 200:
            raise AssertionError(f"GET the file of {sop_instance_uid}: HTTP {status}")
        return body

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
