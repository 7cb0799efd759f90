"""Deployment files hold together: compose files, Dockerfile stages and pins, the certificate script.

No Docker engine is needed (none runs on the development machines): these check what can be
checked without building images.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"


def _compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _stages() -> set[str]:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    return set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE))


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for dep in deps["dependencies"]:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name)] = version
    return pins


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
        assert build["target"] in _stages(), name


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


def test_tls_override_mounts_files_the_cert_script_writes() -> None:
    # Prepare
    base, tls = _compose("compose.yaml"), _compose("compose.tls.yaml")
    script = MAKE_CERTS.read_text(encoding="utf-8")

    # Assert
    assert set(tls["services"]) <= set(base["services"])
    for name, service in tls["services"].items():
        for volume in service["volumes"]:
            host_path, _target, _mode = volume.rsplit(":", 2)  # host path holds ${VAR:-default}
            host_file = host_path.rsplit("/", 1)[-1]
            assert re.sub(r"-\d+$", "-K", host_file) in script, f"{name}: {host_file}"
            assert "ca.key" not in volume, "the CA key must stay with the operator"
    assert "--enable-supernode-auth" in tls["services"]["superlink"]["command"]


def test_dockerfile_pins_match_pyproject() -> None:
    # Prepare
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    pins = _pins()

    # Assert
    assert f'"flwr=={pins["flwr"]}"' in text
    assert f'"mlflow=={pins["mlflow"]}"' in text


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
