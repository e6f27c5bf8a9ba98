#!/bin/sh
# Container entry point.
#   entrypoint.sh [COMMAND ARGS...]   run `sonocase COMMAND` (default: serve) after
#                                     checking that the data and index volumes are
#                                     writable by this non-root user, so a volume
#                                     owned by root fails at once with the fix in
#                                     the message instead of on the first C-STORE
#                                     (not for a worker with SONOCASE_DATA_ACCESS=http:
#                                     it has no volume).
#   entrypoint.sh healthcheck [node|worker]
#                                     exit 0 while this container's process is
#                                     healthy: the node answers /healthz, a worker
#                                     answers a Celery ping. The role defaults to
#                                     the command PID 1 was started with.
set -eu

if [ "${1:-}" = healthcheck ]; then
    role=${2:-}
    if [ -z "$role" ]; then
        case " $(tr '\0' ' ' < /proc/1/cmdline) " in
            *" worker "*) role=worker ;;
            *) role=node ;;
        esac
    fi
    export SONOCASE_HEALTH_ROLE="$role"
    exec python - <<'PY'
import os, socket, sys, urllib.request

if os.environ["SONOCASE_HEALTH_ROLE"] == "worker":
    from service.pipeline.queue import create_app
    from service.settings import load_settings

    replies = create_app(load_settings()).control.ping(timeout=3.0)
    mine = [name for reply in replies for name in reply if name.endswith("@" + socket.gethostname())]
    sys.exit(0 if mine else f"no Celery worker of host {socket.gethostname()} answered a ping")
port = os.environ.get("SONOCASE_HTTP_PORT", "8080")
urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4)
PY
fi

[ "$#" -gt 0 ] || set -- serve
if [ "$1" = worker ] && [ "${SONOCASE_DATA_ACCESS:-shared}" = http ]; then
    exec sonocase "$@"  # it reaches the node's files over HTTP: no volume of its own
fi
for dir in "${SONOCASE_DATA_DIR:-sonocase-data}" ${SONOCASE_INDEX_DIR:+"$SONOCASE_INDEX_DIR"}; do
    mkdir -p "$dir" 2>/dev/null || true
    if [ ! -d "$dir" ] || [ ! -w "$dir" ]; then
        echo "entrypoint: $dir is not writable by uid $(id -u): give the volume to $(id -u):$(id -g) (e.g. fsGroup or chown)" >&2
        exit 73  # EX_CANTCREAT
    fi
done
exec sonocase "$@"
