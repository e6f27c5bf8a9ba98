#!/usr/bin/env bash
# Build the CPU image and prove that it works as a hospital would run it: the node
# in a container with a read-only root file system, no capabilities and no new
# privileges; DCMTK's storescu pushes a real ultrasound study to it and DCMTK's
# storescp, playing the PACS, must receive the SR. Also checks that the image's
# hnswlib has no AVX code (built without -march=native), that every log line is
# JSON, and that the container stops cleanly on SIGTERM.
#
#   bash deploy/smoke.sh            # podman if installed, else docker
#
# Where no registry is reachable (this project's machines), the base image is a
# Debian bookworm root made with debootstrap and imported into the engine once
# (localhost/sonocase-base:bookworm; kept in the engine's store, so later runs and
# CI reuse it). With a registry, set SMOKE_BASE_IMAGE=python:3.11-slim-bookworm.
# pip's index settings and CA bundle of this machine go into the build as build
# secrets (never into a layer). Results: $SMOKE_OUT (default a temporary folder)
# gets summary.json and the image's hnswlib library.
#
# Environment: CONTAINER_ENGINE (podman|docker), SMOKE_BASE_IMAGE, SMOKE_IMAGE
# (default localhost/sonocase:smoke), SMOKE_OUT, SMOKE_TIMEOUT_S (default 300),
# DEBIAN_MIRROR (default: this machine's apt source, else deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$engine" ] || { echo "smoke: neither podman nor docker is installed" >&2; exit 2; }
engine=$(basename "$engine")
image=${SMOKE_IMAGE:-localhost/sonocase:smoke}
out=${SMOKE_OUT:-$(mktemp -d)}
timeout_s=${SMOKE_TIMEOUT_S:-300}
work=$(mktemp -d)
mkdir -p "$out"
container="sonocase-smoke-$$"
storescp_pid=""
started=$(date +%s)

say() { echo "smoke: $*" >&2; }
cleanup() {
    "$engine" rm -f "$container" >/dev/null 2>&1 || true
    [ -z "$storescp_pid" ] || kill "$storescp_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- podman on a machine whose root may not raise its limits ----------------------------
if [ "$engine" = podman ]; then
    conf="$work/containers.conf"
    printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n' > "$conf"
    export CONTAINERS_CONF="$conf"
fi

# --- the base image -------------------------------------------------------------------------
base=${SMOKE_BASE_IMAGE:-localhost/sonocase-base:bookworm}
if [ -z "${SMOKE_BASE_IMAGE:-}" ] && ! "$engine" image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "smoke: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
    mirror=${DEBIAN_MIRROR:-$({ cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
        | awk '$1 == "URIs:" || $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) { print $i; exit } }')}
    mirror=${mirror:-http://deb.debian.org/debian}
    say "making the base image $base with debootstrap from $mirror (once)"
    root="$work/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
fi

# --- build, with this machine's pip settings as build secrets ----------------------------------
pip_conf="$work/pip.conf"
: > "$pip_conf"
ca=$(python3 -m pip config get global.cert 2>/dev/null || echo "${PIP_CERT:-}")
ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
{
    echo "[global]"
    index=$(python3 -m pip config get global.index-url 2>/dev/null || echo "${PIP_INDEX_URL:-}")
    case "$index" in http*) echo "index-url = $index" ;; esac
    echo "cert = /run/secrets/pip-ca.crt"
} > "$pip_conf"
build_started=$(date +%s)
say "building $image on $base"
"$engine" build -f deploy/Dockerfile --build-arg "PYTHON_IMAGE=$base" -t "$image" \
    --secret "id=pip.conf,src=$pip_conf" --secret "id=pip-ca.crt,src=$ca" . >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log" >&2; exit 1; }
build_s=$(( $(date +%s) - build_started ))

# --- the image's hnswlib, for the CPU-portability check -----------------------------------------
"$engine" run --rm --entrypoint python "$image" -c \
    'import hnswlib, sys; sys.stdout.buffer.write(open(hnswlib.__file__, "rb").read())' > "$out/hnswlib.so"
avx_lines=$(objdump -d --no-show-raw-insn "$out/hnswlib.so" | grep -c -E '%[yz]mm[0-9]' || true)

# --- the node, locked down ----------------------------------------------------------------------
dicom_port=$(free_port); http_port=$(free_port); pacs_port=$(free_port)
mkdir -p "$work/data" "$work/pacs"
chown 10001:10001 "$work/data"
storescp -aet SMOKEPACS -od "$work/pacs" "$pacs_port" >"$work/storescp.log" 2>&1 &
storescp_pid=$!
tmp_mount=(); [ "$engine" = podman ] || tmp_mount=(--tmpfs /tmp)  # podman's --read-only brings one
"$engine" run -d --name "$container" --network host --read-only "${tmp_mount[@]}" \
    --cap-drop ALL --security-opt no-new-privileges \
    -v "$work/data:/data" \
    -e SONOCASE_HOST=127.0.0.1 -e SONOCASE_HTTP_HOST=127.0.0.1 \
    -e SONOCASE_PORT="$dicom_port" -e SONOCASE_HTTP_PORT="$http_port" \
    -e SONOCASE_DESTINATIONS="SMOKEPACS@127.0.0.1:$pacs_port" -e SONOCASE_QUIET_PERIOD_S=2 \
    -e SONOCASE_INDEX_DIR=/data/index \
    "$image" serve >/dev/null

deadline=$(( $(date +%s) + timeout_s ))
until curl -fsS "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1; do
    if [ "$(date +%s)" -gt "$deadline" ] || [ "$("$engine" inspect -f '{{.State.Running}}' "$container")" != true ]; then
        "$engine" logs "$container" >&2 || true
        say "the node did not become ready"; exit 1
    fi
    sleep 1
done
ready_s=$(( $(date +%s) - build_started - build_s ))

# A real ultrasound file that ships in pydicom, read out of the image itself.
"$engine" run --rm --entrypoint python "$image" -c \
    'import sys; from pydicom.data import get_testdata_file as f; sys.stdout.buffer.write(open(f("US1_UNCR.dcm", download=False), "rb").read())' \
    > "$work/us.dcm"
pushed=$(date +%s)
storescu -aec SONOCASE 127.0.0.1 "$dicom_port" "$work/us.dcm"
until ls "$work/pacs" | grep -q '^SR'; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
        "$engine" logs "$container" >&2 || true
        say "no SR arrived at the PACS"; exit 1
    fi
    sleep 1
done
sr_s=$(( $(date +%s) - pushed ))

stop_started=$(date +%s)
"$engine" stop -t 30 "$container" >/dev/null
stop_s=$(( $(date +%s) - stop_started ))
exit_code=$("$engine" inspect -f '{{.State.ExitCode}}' "$container")
"$engine" logs "$container" > "$out/node.log" 2>&1
not_json=$(python3 -c '
import json, sys
bad = 0
for line in open(sys.argv[1], errors="replace"):
    try:
        bad += not isinstance(json.loads(line), dict)
    except ValueError:
        bad += 1
print(bad)' "$out/node.log")
user=$("$engine" run --rm --entrypoint id "$image" -u)
size=$("$engine" image inspect -f '{{.Size}}' "$image")
base_size=$("$engine" image inspect -f '{{.Size}}' "$base")

cat > "$out/summary.json" <<EOF
{"engine": "$engine", "image": "$image", "base": "$base", "image_bytes": $size, "base_bytes": $base_size,
 "build_s": $build_s, "ready_s": $ready_s, "sr_s": $sr_s, "stop_s": $stop_s, "exit_code": $exit_code,
 "uid": $user, "objects_at_pacs": $(ls "$work/pacs" | wc -l), "avx_lines": $avx_lines,
 "log_lines": $(wc -l < "$out/node.log"), "non_json_log_lines": $not_json,
 "total_s": $(( $(date +%s) - started ))}
EOF
cat "$out/summary.json"
[ "$avx_lines" -eq 0 ] || { say "hnswlib in the image uses AVX registers ($avx_lines instructions)"; exit 1; }
[ "$not_json" -eq 0 ] || { say "$not_json log lines are not JSON"; exit 1; }
[ "$exit_code" -eq 0 ] || { say "the node exited with $exit_code on SIGTERM"; exit 1; }
say "passed: image $(( size / 1000000 )) MB, SR after ${sr_s} s, stop in ${stop_s} s"
