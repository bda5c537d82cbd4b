"""The settings the fault guards added: `max_keys`, `header_timeout`, `body_timeout`, from every source, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_KEYS,
    ConfigProblems,
    load_settings,
)
from gateway.stores import open_store
from gateway.stores.memory import MemoryStore

UPSTREAM = {"upstream": "http://127.0.0.1:9"}


def test_defaults() -> None:
    settings = load_settings(UPSTREAM, {})
    assert (settings.max_keys, settings.header_timeout, settings.body_timeout) == (100_000, 10.0, 60.0)
    assert (DEFAULT_MAX_KEYS, DEFAULT_HEADER_TIMEOUT, DEFAULT_BODY_TIMEOUT) == (100_000, 10.0, 60.0)


def test_from_file_env_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "flowgate.toml"
    path.write_text('max_keys = 500\nheader_timeout = "3s"\nbody_timeout = "1m30s"\n')
    settings = load_settings({**UPSTREAM, "config": str(path)}, {})
    assert (settings.max_keys, settings.header_timeout, settings.body_timeout) == (500, 3.0, 90.0)
    env = {"FLOWGATE_MAX_KEYS": "700", "FLOWGATE_HEADER_TIMEOUT": "500ms", "FLOWGATE_BODY_TIMEOUT": "5"}
    settings = load_settings({**UPSTREAM, "config": str(path)}, env)
    assert (settings.max_keys, settings.header_timeout, settings.body_timeout) == (700, 0.5, 5.0)
    assert load_settings({**UPSTREAM, "max_keys": "900"}, env).max_keys == 900


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("FLOWGATE_MAX_KEYS", "0", "max_keys"),
        ("FLOWGATE_MAX_KEYS", "lots", "max_keys"),
        ("FLOWGATE_HEADER_TIMEOUT", "10x", "header_timeout"),
        ("FLOWGATE_HEADER_TIMEOUT", "0", "header_timeout"),
        ("FLOWGATE_BODY_TIMEOUT", "-1s", "body_timeout"),
    ],
)
def test_bad_values_name_the_setting(variable: str, value: str, named: str) -> None:
    with pytest.raises(ConfigProblems) as caught:
        load_settings(UPSTREAM, {variable: value})
    assert variable in str(caught.value) and named in str(caught.value)


def test_open_store_takes_max_keys() -> None:
    store = open_store("memory://", max_keys=3)
    assert isinstance(store, MemoryStore) and store._max_keys == 3
    redis_store = open_store("redis://127.0.0.1:9/0", max_keys=4)
    assert redis_store.max_keys == 4  # type: ignore[attr-defined]
