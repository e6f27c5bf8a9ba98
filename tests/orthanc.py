"""Orthanc from Debian, with its DICOMweb plugin, as a real archive for the tests.

:class:`Orthanc` runs ``/usr/sbin/Orthanc`` with a configuration of its own (storage
in the test's folder, free ports, connections from this host only, optionally HTTP
basic authentication) and offers the few REST calls the tests need: store a file,
list and fetch what it holds. ``orthanc`` is the fixture (one archive per test).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AE = "ORTHANC"


class Orthanc:
    """One Orthanc process on 127.0.0.1 (see module doc); :meth:`stop` ends it."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None, aet: str = ORTHANC_AE,
                 modalities: dict[str, list[Any]] | None = None) -> None:
        if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
            pytest.fail("Orthanc or its DICOMweb plugin is missing: run scripts/setup.sh "
                        "(apt-get install orthanc orthanc-dicomweb)")
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.aet = aet
        self.auth = next(iter(users.items())) if users else None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "sonocase-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "HttpServerEnabled": True,
            "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": self.dicom_port,
            "DicomModalities": modalities or {},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "OrthancExplorerEnabled": False, "WebDavEnabled": False, "ConcurrentJobs": 1,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.log = folder / "orthanc.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok
        except requests.RequestException:
            return False

    def _get(self, path: str) -> requests.Response:
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response

    def store(self, data: bytes) -> str:
        """Store a Part 10 file (REST, not DICOMweb); its Orthanc instance ID."""
        response = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=30)
        response.raise_for_status()
        return str(response.json()["ID"])

    def instance_count(self) -> int:
        return int(self._get("/statistics").json()["CountInstances"])

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance ID, for everything it holds."""
        expanded = self._get("/instances?expand").json()
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in expanded}

    def file(self, sop_instance_uid: str) -> bytes:
        """The stored Part 10 file of an instance, as Orthanc keeps it."""
        return self._get(f"/instances/{self.instances()[sop_instance_uid]}/file").content

    def study_of(self, sop_instance_uid: str) -> str:
        """The Study Instance UID Orthanc filed the instance under."""
        instance_id = self.instances()[sop_instance_uid]
        return str(self._get(f"/instances/{instance_id}/study").json()["MainDicomTags"]["StudyInstanceUID"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc with DICOMweb on 127.0.0.1, no authentication."""
    archive = Orthanc(tmp_path / "orthanc")
    yield archive
    archive.stop()
