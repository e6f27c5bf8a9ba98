"""``sonocase demo``: the whole node at work in a few minutes, nothing to configure.

It starts a stand-in PACS (a Storage SCP that keeps what it receives) and a node on
embedded defaults in a fresh folder, fills a small similar-case library with
synthetic diagnosed studies, pushes a few synthetic studies (normal, benign,
malignant) by C-STORE as a scanner would, waits until their results have reached
the PACS, and prints one line per study, then the SRs rendered as HTML (DCMTK's
``dsr2html``) and the heatmap Secondary Captures as PNG. Synthetic images and the
shipped model only: nothing is downloaded and no real patient is involved.
"""

from __future__ import annotations

import io
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event

from service.cli import peer_param, settings_from
from service.common.spool import write_atomic
from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger, StudyRow, StudyState, open_ledger
from service.model_card import DISCLAIMER
from service.node import Node, node_services
from service.reports.build import SENT_CLASSES
from service.reports.sr import SR_CLASSES
from service.results import StudyResult
from service.settings import Peer, Settings
from service.similar.index import SimilarCaseIndex
from service.similar.references import (
    ReferenceEmbedder,
    dicom_files,
    fill_index,
    read_labels_csv,
)

LOG = logging.getLogger(__name__)

SCANNER_AE = "DEMO_SCANNER"
PACS_AE = "DEMO_PACS"
CLASSES = ("normal", "benign", "malignant")
_SUCCESS = 0x0000
_POLL_S = 0.25


class StandInPacs:
    """A Storage SCP on loopback that writes every object the node sends (SR, SC,
    heatmap overlay SEG, key-image flag) to ``folder/<study>/<sop>.dcm``: where the
    node's results land in the demo."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.folder = folder
        self._ae = AE(ae_title=PACS_AE)
        for sop_class in SENT_CLASSES:
            self._ae.add_supported_context(
                sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit]
            )
        self._port = port
        self._server: Any = None
        self._lock = threading.Lock()
        self.received: dict[str, list[Path]] = {}

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        write_atomic(path, out.getvalue(), durable=False)
        with self._lock:
            self.received.setdefault(str(ds.StudyInstanceUID), []).append(path)
        return _SUCCESS

    def start(self) -> None:
        self._server = self._ae.start_server(
            ("127.0.0.1", self._port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def objects(self, study_uid: str) -> list[Path]:
        with self._lock:
            return list(self.received.get(study_uid, []))


def push_study(datasets: Sequence[Dataset], host: str, port: int, called_ae: str) -> float:
    """Send a study over one association as a scanner would; return when the last
    instance was acknowledged (``time.time()``). Raises if any is refused."""
    ae = AE(ae_title=SCANNER_AE)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise click.ClickException(f"the node at {host}:{port} refused the association from {SCANNER_AE}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.get("Status", -1)) if status else -1
            if code != _SUCCESS:
                raise click.ClickException(f"the node answered C-STORE of {ds.SOPInstanceUID} with 0x{code:04X}")
    finally:
        assoc.release()
    return time.time()


def build_library(settings: Settings, per_class: int, seed: int) -> str:
    """A similar-case library of synthetic studies labelled with the generator's
    ground truth (label source "synthetic") (other synthetic patients than the pushed ones); return its version."""
    from service.datasets.synthetic import write_dicom_dataset

    embedder = ReferenceEmbedder(settings)
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix="library-") as tmp:
        _, labels_csv = write_dicom_dataset(Path(tmp), per_class, seed)
        labels = read_labels_csv(labels_csv, embedder.card.classes)
        with SimilarCaseIndex.from_settings(settings, embedder.identity) as index:
            report = fill_index(index, embedder.embed, dicom_files(Path(tmp)), labels)
            if report.failed:
                raise click.ClickException(f"library images could not be indexed: {report.failed}")
            return index.version


def wait_until_delivered(
    ledger: Ledger,
    study_uids: Sequence[str],
    timeout_s: float,
) -> dict[str, StudyRow]:
    """Wait until the ledger has every study sent (its results in the PACS) or failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        studies = {uid: ledger.study(uid) for uid in study_uids}
        done = {
            uid: s for uid, s in studies.items() if s is not None and s.state in (StudyState.SENT, StudyState.FAILED)
        }
        if len(done) == len(studies):
            return done
        if time.monotonic() > deadline:
            states = ", ".join(f"{uid}: {s.state if s else 'not received'}" for uid, s in studies.items())
            raise click.ClickException(f"no result after {timeout_s:.0f} s ({states}); see the log above")
        time.sleep(_POLL_S)


@dataclass(frozen=True)
class Outputs:
    html: list[Path]
    png: list[Path]


def render_outputs(objects: Sequence[Path], out_dir: Path) -> Outputs:
    """SRs to HTML with DCMTK's dsr2html, Secondary Captures to PNG."""
    dsr2html = "/usr/bin/dsr2html" if Path("/usr/bin/dsr2html").exists() else shutil.which("dsr2html")
    out_dir.mkdir(parents=True, exist_ok=True)
    html, png = [], []
    for path in sorted(objects):
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID in SR_CLASSES:
            if dsr2html is None:
                LOG.warning("dsr2html (DCMTK) is not installed: %s is not rendered", path.name)
                continue
            target = out_dir / f"{path.stem}.html"
            subprocess.run([dsr2html, str(path), str(target)], check=True, capture_output=True, timeout=60)
            html.append(target)
        elif ds.SOPClassUID == SecondaryCaptureImageStorage:
            target = out_dir / f"{path.stem}.png"
            Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(target)
            png.append(target)
    return Outputs(html, png)


def study_line(truth: str, study: StudyRow, result: StudyResult | None, seconds: float) -> list[str]:
    """One row of the table: what was sent, what came back, how long it took."""
    if study.state == StudyState.FAILED or result is None:
        return [truth, "FAILED", "", f"{study.failed_stage}: {study.error}", f"{seconds:.1f}"]
    summary = result.summary
    predicted = "not assessed" if summary.out_of_distribution else str(summary.predicted)
    probability = "" if summary.probability is None else f"{summary.probability:.2f}"
    similar = ", ".join(f"{s.label} ({s.distance:.2f})" for s in result.similar[:3]) or "none"
    return [truth, predicted, probability, similar, f"{seconds:.1f}"]


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command()
@click.option(
    "--studies",
    type=click.IntRange(1, 30),
    default=3,
    show_default=True,
    help="Synthetic studies to push, cycling normal, benign, malignant.",
)
@click.option("--images", type=click.IntRange(1, 8), default=2, show_default=True, help="Images per study.")
@click.option(
    "--library",
    type=click.IntRange(1, 100),
    default=4,
    show_default=True,
    help="Diagnosed synthetic patients per class in the similar-case library.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the demo's node, PACS and outputs (default: a new temporary folder).",
)
@click.option(
    "--timeout", type=click.IntRange(10), default=600, show_default=True, help="Seconds to wait for the results."
)
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    callback=peer_param,
    metavar="AE@HOST:PORT[+tls]|URL",
    help="Also send the results here, e.g. a DICOMweb archive's base URL (STOW-RS); repeatable. "
    "Credentials: the dicomweb_* settings.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    studies: int,
    images: int,
    library: int,
    data_dir: Path | None,
    timeout: int,
    destinations: tuple[Peer, ...],
) -> None:
    """Self-contained demo: a node, a stand-in PACS and synthetic studies.

    Prints per study the predicted class, its probability, the closest similar
    studies and the time from the last C-STORE to the results being in the PACS
    (and in every --destination), then where the SRs (as HTML) and heatmaps (as PNG)
    are.
    """
    folder = data_dir or Path(tempfile.mkdtemp(prefix="sonocase-demo-"))
    pacs = StandInPacs(folder / "pacs")
    pacs.start()
    try:
        settings = settings_from(
            ctx,
            data_dir=folder / "node",
            host="127.0.0.1",
            port=_free_port(),
            http_port=0,
            quiet_period_s=2.0,
            durability="none",
            allowed_callers=[SCANNER_AE],
            destinations=[f"{PACS_AE}@127.0.0.1:{pacs.port}", *map(str, destinations)],
            workers=1,
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        click.echo(f"demo folder {folder}")
        click.echo(f"building a similar-case library of {library} diagnosed synthetic patients per class ...")
        click.echo(f"library version {build_library(settings, library, seed=1)}")
        _run(settings, pacs, folder, studies, images, timeout)
    finally:
        pacs.stop()


def _run(settings: Settings, pacs: StandInPacs, folder: Path, studies: int, images: int, timeout: int) -> None:
    """Start the node, push the studies, wait, print the table and the output paths."""
    ledger = open_ledger(settings, durable=False)
    node = Node(node_services(settings, ledger))
    try:
        node.start()
        click.echo(
            f"node {settings.ae_title} listening on {settings.host}:{settings.port}; "
            f"stand-in PACS {PACS_AE} on 127.0.0.1:{pacs.port}"
        )
        pushed: dict[str, tuple[str, float]] = {}
        for number in range(studies):
            truth = CLASSES[number % len(CLASSES)]
            datasets = synthetic_study(images, truth, seed=1000 + number)
            done = push_study(datasets, settings.host, settings.port, settings.ae_title)
            pushed[str(datasets[0].StudyInstanceUID)] = (truth, done)
            click.echo(f"pushed a {truth} study of {images} images by C-STORE")
        click.echo(
            f"waiting for the results (quiet period {settings.quiet_period_s:.0f} s, analysis, report, send) ..."
        )
        final = wait_until_delivered(ledger, list(pushed), timeout)
        rows = [["sent", "predicted", "probability", "similar studies (distance)", "seconds"]]
        outputs = Outputs([], [])
        for uid, (truth, pushed_at) in pushed.items():
            study = final[uid]
            seconds = (study.sent_at or time.time()) - pushed_at
            rows.append(study_line(truth, study, ledger.result(uid), seconds))
            rendered = render_outputs(pacs.objects(uid), folder / "outputs" / uid)
            outputs = Outputs(outputs.html + rendered.html, outputs.png + rendered.png)
    finally:
        node.stop()
        ledger.close()
    click.echo("\n" + _table(rows) + "\n")
    click.echo("seconds: from the last image's C-STORE to the results being stored in the PACS")
    click.echo("structured reports (HTML):\n" + "\n".join(f"  {p}" for p in outputs.html))
    click.echo("heatmaps and similar cases (PNG):\n" + "\n".join(f"  {p}" for p in outputs.png))
    click.echo(f"\n{DISCLAIMER}")
    if any(s.state == StudyState.FAILED for s in final.values()):
        raise click.ClickException("some studies failed; the table says where")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
