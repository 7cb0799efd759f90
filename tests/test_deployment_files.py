"""Deployment files hold together: compose files, Dockerfile stages and pins, the certificate script.

No Docker engine is needed (none runs on the development machines): these check what can be
checked without building images. That includes the deployment's access control: the SuperExec
secret on both sides of the SuperLink's Runtime API, a non-root user in every image, and
MLflow's basic-auth login.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
COMPOSE_FILES = ("compose.yaml", "compose.tls.yaml", "compose.auth.yaml")
SECRET_FLAG = "--superexec-auth-secret-file"


# ---------------------------------------------------------------------------------- compose files
class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that reads Compose's merge tags: `!override` keeps the value, `!reset` is None."""


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!override", _override)
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _compose(name: str) -> dict[str, Any]:
    data = yaml.load((DOCKER / name).read_text(encoding="utf-8"), Loader=_ComposeLoader)
    assert isinstance(data, dict)
    return data


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host path or volume name, mode) of a service's volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
        source, target = parts[0], parts[1]
        mounts[target] = (source, parts[2] if len(parts) == 3 else "rw")
    return mounts


def _option_value(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


# ---------------------------------------------------------------------------------- Dockerfile
@dataclass
class _Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def _dockerfile() -> dict[str, _Stage]:
    """Stages of docker/Dockerfile by name, each with its instructions (continuations joined)."""
    stages: dict[str, _Stage] = {}
    current: _Stage | None = None
    logical = ""
    for raw in (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line.removesuffix("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, arguments = logical.strip().partition(" ")
        logical = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", arguments.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            current = stages[match.group(2)] = _Stage(match.group(2), match.group(1))
        elif current is None:  # only a build argument the FROM lines use may come first
            assert keyword == "ARG", f"{keyword} before the first FROM"
        else:
            current.instructions.append((keyword, arguments.strip()))
    return stages


def _chain(stages: dict[str, _Stage], target: str) -> list[tuple[str, str]]:
    """The instructions that build `target`: its base stages' first, then its own."""
    stage = stages[target]
    inherited = _chain(stages, stage.base) if stage.base in stages else []
    return inherited + stage.instructions


def _effective_user(stages: dict[str, _Stage], target: str) -> str:
    """The USER a container of `target` runs as: the last USER of its stage or of a base stage."""
    users = [args for keyword, args in _chain(stages, target) if keyword == "USER"]
    return users[-1] if users else "root"  # both base images (BASE_IMAGE) run as root


def _final_stages(stages: dict[str, _Stage]) -> set[str]:
    """Stages no other stage builds on, plus the default target (the last stage)."""
    bases = {stage.base for stage in stages.values()}
    return {name for name in stages if name not in bases} | {list(stages)[-1]}


def _compose_targets() -> dict[str, set[str]]:
    """Dockerfile target -> the container paths compose mounts named volumes at, over all files."""
    targets: dict[str, set[str]] = {}
    base = _compose("compose.yaml")["services"]
    for name in COMPOSE_FILES:
        for service_name, service in _compose(name)["services"].items():
            build = service.get("build") or base[service_name]["build"]
            paths = targets.setdefault(build["target"], set())
            for target, (source, _mode) in _mounts(service).items():
                if "/" not in source:  # a named volume, not a bind-mounted host file
                    paths.add(target)
    return targets


def _owned_before(chain: list[tuple[str, str]], path: str, uid: str, until: int) -> bool:
    """Whether a RUN before instruction `until` creates or chowns `path` for `uid`."""
    owner = re.compile(rf"(?:\binstall\s+-d\b.*\s-o\s+{uid}\b|\bchown\s+(?:-R\s+)?{uid}\b)")
    return any(
        keyword == "RUN" and path in args.split() and owner.search(args)
        for keyword, args in chain[:until]
    )


# ---------------------------------------------------------------------------------- pins
def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for dep in deps["dependencies"]:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name)] = version
    return pins


# ---------------------------------------------------------------------------------- tests
def test_compose_services_build_existing_dockerfile_targets() -> None:
    # Prepare
    compose = _compose("compose.yaml")

    # Assert
    services = compose["services"]
    assert {"superlink", "serverapp", "mlflow", "supernode-1", "supernode-2"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file(), name
        assert build["target"] in _dockerfile(), name


def test_compose_volumes_are_declared_and_nodes_read_their_own_volume() -> None:
    # Prepare
    compose = _compose("compose.yaml")
    declared = set(compose["volumes"])

    # Assert
    node_volumes = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert source in declared, f"{name}: volume {source} not declared"
            if name.startswith("supernode"):
                node_volumes.append(source)
                manifest = re.search(r'manifest="([^"]+)"', " ".join(service["command"]))
                assert manifest and manifest.group(1).startswith(target + "/"), name
    assert len(node_volumes) == len(set(node_volumes)) == 2, "each node needs its own data volume"


def test_override_files_only_touch_services_of_the_base_file() -> None:
    # Prepare
    base = set(_compose("compose.yaml")["services"])

    # Assert
    for name in COMPOSE_FILES[1:]:
        assert set(_compose(name)["services"]) <= base, name


def test_insecure_compose_publishes_ports_on_loopback_only() -> None:
    # Prepare
    services = _compose("compose.yaml")["services"]
    header = (DOCKER / "compose.yaml").read_text(encoding="utf-8").split("\nname:")[0]

    # Assert: no TLS and no authentication in this file, so nothing listens beyond this host
    assert "--insecure" in services["superlink"]["command"]
    assert services["superlink"]["ports"] == ["127.0.0.1:9092:9092"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "single trusted host" in header


def test_tls_override_mounts_files_the_cert_script_writes() -> None:
    # Prepare
    tls = _compose("compose.tls.yaml")
    script = MAKE_CERTS.read_text(encoding="utf-8")

    # Assert
    for name, service in tls["services"].items():
        for volume in service["volumes"]:
            host_path, _target, mode = volume.rsplit(":", 2)  # host path holds ${VAR:-default}
            host_file = host_path.rsplit("/", 1)[-1]
            assert re.sub(r"-\d+$", "-K", host_file) in script, f"{name}: {host_file}"
            assert mode == "ro", f"{name}: {volume}"
            assert "ca.key" not in volume, "the CA key must stay with the operator"
    assert "--enable-supernode-auth" in tls["services"]["superlink"]["command"]


def test_tls_override_passes_the_superexec_secret_to_superlink_and_serverapp() -> None:
    # Prepare
    services = _compose("compose.tls.yaml")["services"]

    # Execute: the host file behind the secret each side is given
    secret_files = {}
    for name in ("superlink", "serverapp"):
        path = _option_value(services[name]["command"], SECRET_FLAG)
        mounts = _mounts(services[name])
        assert path in mounts, f"{name}: {path} is not mounted"
        host_path, mode = mounts[path]
        assert mode == "ro", name
        secret_files[name] = host_path

    # Assert: one secret file on both sides, honoured only in process isolation
    assert secret_files["superlink"] == secret_files["serverapp"]
    assert secret_files["superlink"].endswith("/superexec.secret")
    assert _option_value(services["superlink"]["command"], "--isolation") == "process"


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen"
)
def test_cert_script_writes_every_file_the_tls_override_mounts(tmp_path: Path) -> None:
    # Prepare
    services = _compose("compose.tls.yaml")["services"]
    out = tmp_path / "certs"

    # Execute
    subprocess.run(
        ["bash", str(MAKE_CERTS), "--san", "superlink", "--nodes", "2", str(out)],
        check=True,
        capture_output=True,
    )

    # Assert
    for name, service in services.items():
        for host_path, _mode in _mounts(service).values():
            host_file = out / host_path.rsplit("/", 1)[-1]
            assert host_file.is_file() and host_file.stat().st_size > 0, f"{name}: {host_file}"
    secret = out / "superexec.secret"
    assert secret.stat().st_mode & 0o077 == 0, "the SuperExec secret is private"
    assert re.fullmatch(rb"[0-9a-f]{64}\n", secret.read_bytes())  # `openssl rand -hex 32`


def test_compose_flower_commands_use_options_of_the_pinned_flwr() -> None:
    # Prepare: the argument parsers of the installed (pinned) flwr's CLIs
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parsers: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "superlink": _parse_args_run_superlink,
        "serverapp": superexec_parser,
        "supernode-1": _parse_args_run_supernode,
        "supernode-2": _parse_args_run_supernode,
    }

    # Execute + Assert: every command parses (argparse exits on an unknown option)
    for file in COMPOSE_FILES:
        for name, service in _compose(file)["services"].items():
            if name not in parsers or "command" not in service:
                continue
            try:
                parsers[name]().parse_args(service["command"])
            except SystemExit:
                pytest.fail(f"{file}: {name}: flwr rejects {service['command']}")


def test_dockerfile_pins_match_pyproject() -> None:
    # Prepare
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    pins = _pins()

    # Assert
    assert f'"flwr=={pins["flwr"]}"' in text
    assert f'"mlflow[auth]=={pins["mlflow"]}"' in text


def test_every_image_runs_as_a_non_root_user_that_the_image_creates() -> None:
    # Prepare
    stages = _dockerfile()
    targets = _final_stages(stages) | set(_compose_targets())

    # Assert
    assert {"superlink", "mlflow", "supernode", "serverapp", "cli"} <= targets
    for target in targets:
        user = _effective_user(stages, target)
        uid = user.split(":")[0]
        assert uid not in {"", "0", "root"}, f"{target} runs as {user!r}"
        assert uid.isdigit(), f"{target}: a numeric uid ({user!r}) lets runtimes verify non-root"
        created = [args for kw, args in _chain(stages, target) if kw == "RUN" and "useradd" in args]
        assert any(re.search(rf"--uid\s+{uid}\b", args) for args in created), target


def test_every_image_owns_the_folders_it_writes() -> None:
    # Prepare
    stages = _dockerfile()
    mounted = _compose_targets()

    # Assert: volumes (declared or mounted by compose) and the working directory are the user's
    for target in _final_stages(stages) | set(mounted):
        chain = _chain(stages, target)
        uid = _effective_user(stages, target).split(":")[0]
        declared = {
            index: path
            for index, (keyword, args) in enumerate(chain)
            if keyword == "VOLUME"
            for path in re.findall(r'"([^"]+)"', args) or args.split()
        }
        for index, path in declared.items():
            assert _owned_before(chain, path, uid, index), f"{target}: VOLUME {path} not chowned"
        for path in mounted.get(target, set()):
            assert path in declared.values(), f"{target}: compose mounts {path}, not a VOLUME"
        workdir = [args for keyword, args in chain if keyword == "WORKDIR"][-1]
        assert _owned_before(chain, workdir, uid, len(chain)), f"{target}: WORKDIR {workdir}"


def test_auth_override_runs_mlflow_with_basic_auth() -> None:
    # Prepare
    base = _compose("compose.yaml")["services"]
    auth = _compose("compose.auth.yaml")["services"]
    mlflow, serverapp = auth["mlflow"], auth["serverapp"]

    # Execute: the base command plus the app; the ini the server reads
    command = mlflow["command"]
    app = _option_value(command, "--app-name")
    start = command.index("--app-name")
    rest = command[:start] + command[start + 2 :]
    ini_path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    host_ini, mode = _mounts(mlflow)[ini_path]
    ini = configparser.ConfigParser()
    ini.read(DOCKER / host_ini, encoding="utf-8")

    # Assert
    assert app == "basic-auth"
    assert importlib.metadata.entry_points(group="mlflow.app", name=app), "not in pinned mlflow"
    assert rest == base["mlflow"]["command"], "compose replaces command: keep the base options"
    assert mode == "ro"
    volume_root = next(t for t, (s, _) in _mounts(base["mlflow"]).items() if "/" not in s)
    auth_db = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert auth_db.startswith(volume_root + "/"), "the user database must persist in the volume"
    assert "admin_password" not in ini["mlflow"], "no password in a file in the repository"
    for variable in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert ":?" in mlflow["environment"][variable], f"{variable}: required, no default"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(serverapp["environment"])


def test_mlflow_image_installs_what_basic_auth_imports() -> None:
    # Prepare
    chain = _chain(_dockerfile(), "mlflow")
    requirements = importlib.metadata.requires("mlflow") or []

    # Assert: the auth extra of the pinned mlflow is what brings Flask-WTF
    assert any("flask-wtf" in req.lower() and 'extra == "auth"' in req for req in requirements)
    assert any(kw == "RUN" and '"mlflow[auth]==' in args for kw, args in chain)


def test_deployment_doc_covers_the_access_controls() -> None:
    # Prepare
    doc = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    compose_text = "\n".join((DOCKER / name).read_text(encoding="utf-8") for name in COMPOSE_FILES)

    # Assert
    for needle in (
        SECRET_FLAG,  # SuperExec authentication
        "superexec.secret",
        "openssl rand -hex 32",
        "--isolation process",
        "uid 10001",  # the non-root user
        "USER 10001:10001",
        "--app-name basic-auth",  # MLflow's login
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "update-password",
        "compose.auth.yaml",
        "single trusted host",
    ):
        assert needle in doc, needle
    assert "no login" not in doc.lower()
    assert "no login" not in compose_text.lower()


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen"
)
def test_make_certs_is_idempotent_and_the_chain_verifies(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "certs"

    # Execute: twice with the same arguments, then with one more SAN
    subprocess.run(["bash", str(MAKE_CERTS), "--nodes", "2", str(out)], check=True)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    subprocess.run(["bash", str(MAKE_CERTS), "--nodes", "2", str(out)], check=True)
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    subprocess.run(["bash", str(MAKE_CERTS), "--san", "superlink", str(out)], check=True)

    # Assert
    assert first == second
    for name in ("ca.crt", "server.crt", "server.key", "supernode-1", "supernode-2.pub"):
        assert (out / name).is_file(), name
    assert (out / "server.key").stat().st_mode & 0o077 == 0
    assert (out / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    verify = ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")]
    subprocess.run(verify, check=True, capture_output=True)
    sans = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:localhost" in sans and "IP Address:127.0.0.1" in sans and "DNS:superlink" in sans
    assert (out / "ca.crt").read_bytes() == first["ca.crt"]  # new SAN: same CA, new server cert
    assert (out / "superexec.secret").read_bytes() == first["superexec.secret"]  # kept
