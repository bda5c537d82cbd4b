"""The Dockerfile, docker-compose and Kubernetes examples stay consistent with the code (no Docker engine here)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.admin import build_admin_app
from gateway.config import check_config_file
from gateway.engine import FlowController
from gateway.stores import MemoryStore
from tests.live import serving
from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def dockerfile_instruction(name: str) -> list[str]:
    """The JSON (exec form) argument of the last `name` instruction, joining continuation lines."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(name + " ")]
    argument = lines[-1][len(name) :].strip()
    if name == "HEALTHCHECK":
        argument = argument[argument.index("CMD ") + 4 :]
    parsed: list[str] = json.loads(argument)
    return parsed


def test_dockerfile_entrypoint_is_flowgate_serve() -> None:
    assert dockerfile_instruction("ENTRYPOINT") == ["flowgate", "serve"]
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in text
    assert "curl" not in text and "wget" not in text


async def run_probe(command: list[str], env: dict[str, str]) -> int:
    python = sys.executable if command[0] == "python" else command[0]
    process = await asyncio.create_subprocess_exec(python, *command[1:], env={**os.environ, **env})
    return await asyncio.wait_for(process.wait(), 30)


async def test_dockerfile_healthcheck_command_against_a_live_admin_port() -> None:
    command = dockerfile_instruction("HEALTHCHECK")
    assert command[:2] == ["python", "-c"]
    controller = FlowController(MemoryStore())
    try:
        async with serving(build_admin_app(controller)) as url:
            port = url.rsplit(":", 1)[1]
            assert await run_probe(command, {"FLOWGATE_ADMIN_PORT": port}) == 0
    finally:
        await controller.close()
    assert await run_probe(command, {"FLOWGATE_ADMIN_PORT": str(free_port())}) != 0  # nothing listens


def load_kubernetes() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "pod.yaml").read_text()))


def test_kubernetes_sidecar_config_is_valid(tmp_path: Path) -> None:
    config_map, secret, pod, service = load_kubernetes()
    path = tmp_path / "flowgate.toml"
    path.write_text(config_map["data"]["flowgate.toml"])
    assert check_config_file(str(path)) == []
    _app, gateway = pod["spec"]["containers"]
    assert gateway["args"] == ["--config", "/etc/flowgate/flowgate.toml"]
    assert gateway["volumeMounts"][0]["mountPath"] == "/etc/flowgate"
    env = {item["name"]: item for item in gateway["env"]}
    assert set(env) == {"FLOWGATE_STORE", "FLOWGATE_ADMIN_TOKEN"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # drain_timeout
    assert service["spec"]["ports"][0]["targetPort"] == gateway["ports"][0]["name"]
    assert secret["kind"] == "Secret"


def test_compose_mounts_the_checked_config() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:2] == ["--config", "/etc/flowgate/flowgate.toml"]
    assert "./flowgate.toml:/etc/flowgate/flowgate.toml:ro" in gateway["volumes"]
    assert gateway["environment"]["FLOWGATE_STORE"].startswith("redis://")
    assert check_config_file(str(EXAMPLES / "flowgate.toml")) == []
