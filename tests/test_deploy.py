"""deploy/: what can be checked without a container engine. The compose file is
validated by Debian's docker-compose; the Kubernetes manifests and Dockerfiles are
checked for the wiring mistakes that break a deployment (selectors, volumes,
settings names and values, build context); the image's entry point runs as a plain
process against real DCMTK and a real Redis."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Destination, Settings, load_settings
from tests.support.common import dcmtk, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
COMPOSE_ENV = {
    "SONOCASE_WEB_TOKEN": "compose-test-token",
    "SONOCASE_WORKER_TOKEN": "compose-worker-token",
    "SONOCASE_DB_PASSWORD": "db-secret",
    "FLOWER_BASIC_AUTH": "ops:secret",
}


def _settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Validate deployment environment values exactly as the node would at start."""
    for name in [n for n in os.environ if n.startswith("SONOCASE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _sonocase_names(env: dict[str, str]) -> set[str]:
    return {k for k in env if k.startswith("SONOCASE_")}


def _setting_names() -> set[str]:
    return {"SONOCASE_" + name.upper() for name in Settings.model_fields}


# --- compose ---------------------------------------------------------------------------
def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is missing: run scripts/setup.sh (apt-get install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    return subprocess.run(
        [binary, "-f", str(DEPLOY / "compose.yaml"), "config"],
        check=False,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_compose_file_validates_and_wires_node_workers_and_pacs(monkeypatch: pytest.MonkeyPatch) -> None:
    done = _compose_config(COMPOSE_ENV)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == {"redis", "postgres", "node", "worker", "flower", "orthanc"}

    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])

    node, worker = services["node"], services["worker"]
    assert node["command"] == ["serve"] and worker["command"] == ["worker"]
    assert node["environment"]["SONOCASE_WORKERS"] == "0"  # workers are their own service
    assert int(worker["deploy"]["replicas"]) >= 2
    assert {"sonocase-data:/data:rw", "sonocase-index:/index:rw"} <= set(node["volumes"])
    assert "volumes" not in worker  # the node's files reach the workers over HTTP
    for service in (node, worker):
        assert _sonocase_names(service["environment"]) <= _setting_names()
    settings = _settings_from_env(node["environment"], monkeypatch)
    worker_settings = _settings_from_env(worker["environment"], monkeypatch)
    assert worker_settings.data_access == "http" and worker_settings.worker_token == settings.worker_token
    assert worker_settings.node_url == f"http://node:{settings.http_port}"
    assert settings.broker_url == worker_settings.broker_url and settings.broker_url.startswith("redis://redis:")
    # One ledger for all, in the postgres service, which the node waits for.
    assert settings.ledger_url == worker_settings.ledger_url
    assert settings.ledger_url.startswith("postgresql://sonocase@postgres:5432/")
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert node["environment"]["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert "--broker=" + settings.broker_url in services["flower"]["command"]

    # Orthanc pushes to the node, and the node sends its results back to Orthanc.
    orthanc_config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    target = orthanc_config["DicomModalities"]["sonocase"]
    assert (target["AET"], target["Host"], target["Port"]) == (settings.ae_title, "node", settings.port)
    assert orthanc_config["DicomAet"] in settings.allowed_callers
    assert settings.destinations == [
        Destination(ae_title=orthanc_config["DicomAet"], host="orthanc", port=orthanc_config["DicomPort"])
    ]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["orthanc"]["volumes"] if v.startswith("/")}
    for script in orthanc_config["LuaScripts"]:
        lua = mounts[script].read_text()
        assert "SendToModality(instanceId, 'sonocase')" in lua
        assert f"origin['RemoteAet'] == '{settings.ae_title}'" in lua  # results are not sent back round


@pytest.mark.integration
@pytest.mark.parametrize("secret", ["SONOCASE_WEB_TOKEN", "SONOCASE_WORKER_TOKEN", "SONOCASE_DB_PASSWORD"])
def test_compose_refuses_to_start_without_a_secret(secret: str) -> None:
    done = _compose_config({k: v for k, v in COMPOSE_ENV.items() if k != secret})
    assert done.returncode != 0 and secret in done.stderr


# --- Kubernetes --------------------------------------------------------------------------
def _manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, "every manifest is in kustomization.yaml and nothing else"
    docs = [d for name in sorted(listed) for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_kubernetes_manifests_are_wired_together(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _manifests()
    claims = _by_kind(docs, "PersistentVolumeClaim")
    deployments = _by_kind(docs, "Deployment")
    workloads = deployments | _by_kind(docs, "StatefulSet")
    config = _by_kind(docs, "ConfigMap")["sonocase-config"]["data"]
    assert _sonocase_names(config) == set(config) and set(config) <= _setting_names()

    for name, workload in workloads.items():
        template = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), name
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in template["spec"]["containers"]:
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (name, probe)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claim_templates, (name, mount)
            # A value from the secret stands in as "secret" (the settings need it set).
            env = {e["name"]: e.get("value", "secret" if "valueFrom" in e else "") for e in container.get("env", [])}
            assert _sonocase_names(env) <= _setting_names(), name
            if workload["kind"] == "Deployment":
                plain = {k: v for k, v in env.items() if v}
                _settings_from_env(config | plain, monkeypatch)  # values valid for the node
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None:  # the node's alone: no ReadWriteMany storage needed
                assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"], claim
                assert name == "sonocase-node", f"{name} mounts the node's volume {claim}"

    for service in _by_kind(docs, "Service").values():
        selected = [
            w
            for w in workloads.values()
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports

    node = deployments["sonocase-node"]["spec"]["template"]["spec"]["containers"][0]
    assert node["args"] == ["serve"] and {"dicom", "http"} <= {p["name"] for p in node["ports"]}
    assert node["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
    http_port = next(p["containerPort"] for p in node["ports"] if p["name"] == "http")
    assert str(http_port) == config["SONOCASE_HTTP_PORT"]

    worker_pod = deployments["sonocase-worker"]["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    assert worker["args"][0] == "worker" and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The ledger is in PostgreSQL, so workers may run on any host (no affinity to the node's).
    assert "podAffinity" not in worker_pod.get("affinity", {})
    # ... and reads studies from the node's HTTP Service, with the node's worker token.
    worker_env = {e["name"]: e for e in worker["env"]}
    assert worker_env["SONOCASE_DATA_ACCESS"]["value"] == "http"
    http_service = _by_kind(docs, "Service")["sonocase-http"]["spec"]["ports"][0]
    assert worker_env["SONOCASE_NODE_URL"]["value"] == f"http://sonocase-http:{http_service['port']}"
    node_env = {e["name"]: e for e in node["env"]}
    assert worker_env["SONOCASE_WORKER_TOKEN"]["valueFrom"] == node_env["SONOCASE_WORKER_TOKEN"]["valueFrom"]
    assert config["SONOCASE_LEDGER_URL"].startswith("postgresql://")
    assert "sonocase-postgres" in _by_kind(docs, "StatefulSet")
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["sonocase-worker"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "sonocase-worker" and hpa["maxReplicas"] > hpa["minReplicas"]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "sonocase_queue_depth"


# --- images ------------------------------------------------------------------------------
def _dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of
    its parent folders decides."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in (r for r in rules if r and not r.startswith("#")):
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def _source_files() -> list[str]:
    """Files of the working tree that git does not ignore (what a clone would hold)."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


@pytest.mark.integration
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_builds_from_what_the_context_holds(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage: compilers stay in the build stage"
    final = lines[lines.index(stages[-1]) :]
    build = lines[lines.index(stages[0]) : lines.index(stages[-1])]
    assert any("build-essential" in line for line in build), "hnswlib compiles from source"
    assert not any("build-essential" in line for line in final)
    user = next(line.split()[1] for line in final if line.startswith("USER "))
    assert user.split(":")[0] not in {"0", "root"}
    assert any(line.startswith("HEALTHCHECK") for line in final)
    assert any(line.startswith("VOLUME") and "/data" in line and "/index" in line for line in final)
    env_names = set(re.findall(r"\b(SONOCASE_[A-Z_]+)=", " ".join(line for line in final if line.startswith("ENV"))))
    assert env_names and env_names <= _setting_names()

    tracked = _source_files()
    copied = [line.split()[1:-1] for line in build if line.startswith("COPY ") and "--from" not in line]
    for sources in copied:
        for source in sources:
            inside = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
            assert inside, f"COPY {source}: nothing there"
            assert any(not _dockerignore_excludes(f) for f in inside), f"COPY {source}: excluded by .dockerignore"
    for kept_out in (".venv/bin/python", "tests/conftest.py", "sonocase-data/ledger.sqlite3", ".git/HEAD"):
        assert _dockerignore_excludes(kept_out), kept_out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_images_are_portable_and_quiet(dockerfile: str) -> None:
    """hnswlib is compiled in the image without -march=native (its setup.py honours
    HNSWLIB_NO_NATIVE), set before the layer that builds it; the runtime has a
    writable HOME and ONNX Runtime's telemetry off."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    no_native = re.search(r"^ENV .*\bHNSWLIB_NO_NATIVE=1\b", text, re.M)
    assert no_native and no_native.start() < text.index("pip install /app")
    runtime = text[text.rindex("\nFROM ") :]
    assert re.search(r"^ENV .*\bHOME=/tmp\b", runtime, re.M) and "--home-dir /tmp" in runtime
    assert re.search(r"^ENV .*\bORT_DISABLE_TELEMETRY=1\b", runtime, re.M)


def test_gpu_image_swaps_onnxruntime_for_the_gpu_build() -> None:
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "cudnn" in text
    uninstall = text.index("pip uninstall -y onnxruntime")
    assert uninstall < text.index('pip install "onnxruntime-gpu')  # the other order breaks the GPU build
    assert "CUDAExecutionProvider" in text


@pytest.mark.integration
def test_entrypoint_is_executable_in_git() -> None:
    done = subprocess.run(
        ["git", "ls-files", "-s", "deploy/entrypoint.sh"], check=False, cwd=ROOT, capture_output=True, text=True
    )
    assert done.stdout.startswith("100755"), "the image runs deploy/entrypoint.sh directly"


# --- the entry point as a plain process -----------------------------------------------------
def _container_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The image's environment, with paths and ports of this test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SONOCASE_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        SONOCASE_DATA_DIR=str(tmp_path / "data"),
        SONOCASE_INDEX_DIR=str(tmp_path / "index"),
        SONOCASE_HOST="127.0.0.1",
        SONOCASE_HTTP_HOST="127.0.0.1",
        SONOCASE_PORT=str(free_port()),
        SONOCASE_HTTP_PORT=str(free_port()),
        SONOCASE_LOG_FORMAT="json",
        SONOCASE_DURABILITY="none",
        TCP_NODELAY="1",
    )
    return env | extra


@pytest.mark.integration
def test_entrypoint_refuses_a_data_folder_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [str(ENTRYPOINT), "serve"], check=False, env=_container_env(blocker), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 73 and f"{blocker}/data is not writable" in done.stderr


@pytest.mark.integration
def test_entrypoint_runs_the_node(tmp_path: Path) -> None:
    env = _container_env(tmp_path, SONOCASE_WORKERS="0")
    done = subprocess.run([str(ENTRYPOINT), "--help"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "serve" in done.stdout and "worker" in done.stdout

    proc = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # json logs: the listening line is a JSON object too
        assert line.startswith("{"), line + (proc.stderr.read() if proc.poll() is not None else "")
        assert json.loads(line)["message"].startswith("listening as SONOCASE"), line
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", "SONOCASE", "127.0.0.1", env["SONOCASE_PORT"]],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        health = subprocess.run(
            [str(ENTRYPOINT), "healthcheck", "node"], check=False, env=env, capture_output=True, timeout=30
        )
        assert health.returncode == 0, health.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    logs = [json.loads(line) for line in proc.stderr.read().splitlines()]  # every line is JSON
    assert any("HTTP on" in doc["message"] for doc in logs)
    health = subprocess.run(
        [str(ENTRYPOINT), "healthcheck", "node"], check=False, env=env, capture_output=True, timeout=30
    )
    assert health.returncode != 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("access", ["shared", "http"])
def test_entrypoint_worker_answers_its_healthcheck(
    tmp_path: Path, redis_url: str, access: str, request: pytest.FixtureRequest
) -> None:
    """A worker with data_access http has no data volume: it starts with a data
    folder it could not even create (a file stands in its way)."""
    # A Redis database of its own (one per case): a ping must only reach this test's worker.
    database = {"shared": 13, "http": 14}[access]
    env = _container_env(tmp_path, SONOCASE_BROKER_URL=f"{redis_url}/{database}", SONOCASE_HTTP_PORT="0")
    if access == "http":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        env.update(
            SONOCASE_DATA_DIR=str(blocker / "data"),
            SONOCASE_INDEX_DIR=str(blocker / "index"),
            SONOCASE_DATA_ACCESS="http",
            SONOCASE_NODE_URL="http://127.0.0.1:9",
            SONOCASE_WORKER_TOKEN="token",
            SONOCASE_LEDGER_URL=request.getfixturevalue("postgres_url"),
        )
    health = [str(ENTRYPOINT), "healthcheck", "worker"]
    assert subprocess.run(health, check=False, env=env, capture_output=True, timeout=60).returncode != 0
    proc = subprocess.Popen([str(ENTRYPOINT), "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(health, check=False, env=env, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, done.stderr
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the image, built and run ------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_smoke_image_stores_a_study_and_sends_its_sr(tmp_path: Path) -> None:
    """deploy/smoke.sh: the CPU image built with podman (or docker), the node run with a
    read-only root and no capabilities, a real ultrasound study in by storescu, its
    SR out at a storescp; the image's hnswlib has no AVX instruction (its .so is
    disassembled), every log line is JSON, SIGTERM stops it cleanly."""
    if shutil.which("podman") is None and shutil.which("docker") is None:
        pytest.fail("no container engine: run scripts/setup.sh (apt-get install podman debootstrap)")
    out = tmp_path / "smoke"
    done = subprocess.run(
        ["bash", str(DEPLOY / "smoke.sh")],
        check=False,
        env={**os.environ, "SMOKE_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects_at_pacs"] >= 2 and summary["exit_code"] == 0 and summary["uid"] == 10001
    assert summary["non_json_log_lines"] == 0 and summary["log_lines"] > 10
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(out / "hnswlib.so")], capture_output=True, text=True, check=True
    ).stdout
    assert "sse" in disassembly.lower() or "xmm" in disassembly  # the library's vector code is there ...
    assert not re.search(r"%[yz]mm\d", disassembly)  # ... but none of it needs AVX or AVX-512
