#!/usr/bin/env bash
# Install what Sonocase needs on a fresh Debian machine: DCMTK and dicom3tools (real
# DICOM peers and validators), Orthanc with its DICOMweb plugin (a real DICOMweb
# archive) and OHIF (the viewer of the viewer tests), a virtual environment in .venv,
# and the package with its training and test extras. Safe to run again: it skips
# what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
# PixelMed's DicomSRValidator: the SR and KOS checker of IHE AI Results (tests/test_reports_air.py)
[ -f /usr/share/java/pixelmed.jar ] || need_apt+=(libpixelmed-java)
command -v javac >/dev/null 2>&1 || need_apt+=(default-jdk-headless)  # runs tests/PixelmedValidate.java
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)  # the distributed ledger's tests
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # status page tests, headless
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)  # validates deploy/compose.yaml
# The DICOMweb archive of the tests (tests/support/orthanc.py starts its own; not the system service).
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # a STOW-RS client that is not ours; smoke.sh polls /readyz
# deploy/smoke.sh: builds and runs the image (podman), makes its base where no
# registry is reachable (debootstrap), reads the image's hnswlib (objdump)
command -v podman >/dev/null 2>&1 || need_apt+=(podman fuse-overlayfs slirp4netns uidmap)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v objdump >/dev/null 2>&1 || need_apt+=(binutils)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)  # fetches OHIF below
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)  # promtool checks deploy/prometheus/ alert rules
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# OHIF, the viewer of tests/test_viewer.py: the npm package ships a prebuilt dist/ (no
# build); npm checks the tarball against the registry's hash. Keep the version in
# step with tests/support/ohif.py.
ohif=.cache/ohif-3.13.2
if [ ! -f "$ohif/package/dist/index.html" ]; then
    echo "setup: fetching OHIF 3.13.2 (npm package @ohif/app) into $ohif"
    rm -rf "$ohif" && mkdir -p "$ohif"
    (cd "$ohif" && npm pack --silent @ohif/app@3.13.2 >/dev/null && tar xzf ohif-app-3.13.2.tgz && rm ohif-app-3.13.2.tgz)
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.sonocase-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    # torch==2.13.0 is pinned in the 'train' extra: a CPU build, never a CUDA one.
    .venv/bin/python -m pip install -q -e '.[train,dev]'
    # The reference Grad-CAM for tests/test_export.py. --no-deps: grad-cam declares
    # torchvision (and a full opencv), which must not be installed; what it really
    # imports is in the 'dev' extra.
    .venv/bin/python -m pip install -q --no-deps grad-cam==1.5.7 ttach==0.0.3
    echo "$want" > "$stamp"
fi
