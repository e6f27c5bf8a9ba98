#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs it in two
# stages. Stage 1 (about two minutes): ruff lint and format check, mypy, and the fast
# tier (pytest -m "not integration and not heavy": pure functions, no process or server
# started). Stage 2: the integration and heavy tiers (real Redis, PostgreSQL, DCMTK,
# Orthanc, OHIF, podman). With arguments, runs only pytest with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Redis for the integration tests: this machine usually runs one already.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

# pytest exiting 5 (nothing collected) is a failure too: a tier that lost its tests
run_pytest() {
    set +e
    .venv/bin/python -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "test.sh: pytest collected no tests; that is a failure" >&2
        return 1
    fi
    return "$rc"
}

if [ "$#" -gt 0 ]; then
    run_pytest "$@"
    exit $?
fi

# Both pytest stages run two pytest processes (pytest-xdist; SONOCASE_TEST_PROCESSES).
# Stage 2's tests mostly wait on the processes and servers they start, so two finish it
# in about two thirds of the time on two cores; each takes a whole test file at a time
# (--dist loadfile) so a file's module fixtures are made once. Each test's resources are
# its own (free ports, a Redis database it claims, a PostgreSQL database per pytest
# process, temporary folders).
processes=${SONOCASE_TEST_PROCESSES:-2}

echo "test.sh: stage 1: lint, format, types, fast tier"
start=$SECONDS
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
run_pytest -m "not integration and not heavy" -n "$processes"
echo "test.sh: stage 1 took $((SECONDS - start)) s"

echo "test.sh: stage 2: integration and heavy tiers"
run_pytest -m "integration or heavy" -n "$processes" --dist loadfile --durations=25
