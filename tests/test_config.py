"""Settings: precedence (flags > env > file > defaults), validation naming field and line, secrets masked."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import (
    DEFAULT_MAX_BODY,
    ConfigProblems,
    Settings,
    check_config_file,
    key_lines,
    load_settings,
    unknown_env_vars,
)
from gateway.policy import Policy
from gateway.routing import Router

UPSTREAM = {"upstream": "http://127.0.0.1:8000"}


def write(tmp_path: Path, text: str, name: str = "flowgate.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def problems_of(path: str) -> list[str]:
    return [str(problem) for problem in check_config_file(path)]


# -- defaults and precedence ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings(UPSTREAM, {})
    assert settings.store == "memory://"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert (settings.admin_host, settings.admin_port, settings.admin_token) == ("127.0.0.1", 8081, None)
    assert (settings.workers, settings.log_level) == (1, "info")
    assert settings.upstream_timeout == 60.0
    assert settings.max_body == DEFAULT_MAX_BODY == 10_000_000
    assert settings.lease_ttl == 60.0
    assert settings.drain_timeout == 30.0
    assert settings.trust_policy_headers is True
    assert settings.trusted_proxies == ()
    assert settings.default_policy() == Policy(max_waiting=10_000, max_wait=30.0)
    assert settings.rules == ()
    assert settings.config is None


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstream = "http://file:1"
        port = 1000
        log_level = "debug"
        drain_timeout = "5s"
        """,
    )
    env = {"FLOWGATE_CONFIG": path, "FLOWGATE_PORT": "2000", "FLOWGATE_UPSTREAM": "http://env:2"}
    flags = {"port": "3000", "upstream": None}  # None: the flag was not given
    settings = load_settings(flags, env)
    assert settings.port == 3000  # flag
    assert settings.upstream == "http://env:2"  # env over file
    assert settings.log_level == "debug"  # file over default
    assert settings.drain_timeout == 5.0
    assert settings.admin_port == 8081  # default
    assert settings.config == path

    assert load_settings({}, env).port == 2000
    assert load_settings({}, {"FLOWGATE_CONFIG": path}).port == 1000


def test_config_flag_wins_over_config_env(tmp_path: Path) -> None:
    first = write(tmp_path, 'upstream = "http://first:1"\n', "first.toml")
    second = write(tmp_path, 'upstream = "http://second:1"\n', "second.toml")
    settings = load_settings({"config": second}, {"FLOWGATE_CONFIG": first})
    assert settings.upstream == "http://second:1"


def test_every_scalar_from_environment() -> None:
    env = {
        "FLOWGATE_UPSTREAM": "https://app.internal:8443",
        "FLOWGATE_STORE": "redis://127.0.0.1:6379/2",
        "FLOWGATE_HOST": "0.0.0.0",
        "FLOWGATE_PORT": "9000",
        "FLOWGATE_ADMIN_HOST": "::1",
        "FLOWGATE_ADMIN_PORT": "9001",
        "FLOWGATE_ADMIN_TOKEN": "s3cret-token",
        "FLOWGATE_WORKERS": "3",
        "FLOWGATE_LOG_LEVEL": "WARNING",
        "FLOWGATE_ACCESS_LOG": "yes",
        "FLOWGATE_EXPRESS_LANE": "off",
        "FLOWGATE_UPSTREAM_TIMEOUT": "1m30s",
        "FLOWGATE_MAX_BODY": "512KB",
        "FLOWGATE_LEASE_TTL": "2m",
        "FLOWGATE_DRAIN_TIMEOUT": "0",
        "FLOWGATE_TRUST_POLICY_HEADERS": "false",
        "FLOWGATE_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
    }
    settings = load_settings({}, env)
    assert settings.upstream == "https://app.internal:8443"
    assert settings.store_uri.db == 2
    assert (settings.host, settings.port, settings.admin_host, settings.admin_port) == ("0.0.0.0", 9000, "::1", 9001)
    assert settings.admin_token == "s3cret-token"
    assert (settings.workers, settings.log_level, settings.access_log) == (3, "warning", True)
    assert settings.express_lane is False
    assert (settings.upstream_timeout, settings.max_body, settings.lease_ttl) == (90.0, 512_000, 120.0)
    assert settings.drain_timeout == 0.0
    assert settings.trust_policy_headers is False
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstream = "http://127.0.0.1:8000/"
        store = "redis://127.0.0.1:6379/0"
        upstream_timeout = 10
        max_body = "1MiB"
        lease_ttl = "30s"
        trust_policy_headers = false
        trusted_proxies = ["127.0.0.1", "fd00::/8"]
        workers = 2

        [defaults]
        max_waiting = 50
        max_wait = "2s"

        [[rules]]
        name = "webhooks"
        path = "/hooks/"
        methods = ["post"]
        host = "api.example.com"
        key = "tenant:{header:X-Tenant-Id}"
        parallelism = 5
        rate = 100
        period = "1m"

        [[rules]]
        name = "search"
        key = "search"
        rate = "10/second"
        max_waiting = 0
        max_wait = "500ms"
        """,
    )
    settings = load_settings({}, {"FLOWGATE_CONFIG": path})
    assert settings.upstream == "http://127.0.0.1:8000"
    assert (settings.upstream_timeout, settings.max_body, settings.lease_ttl) == (10.0, 1024 * 1024, 30.0)
    assert settings.trusted_proxies == ("127.0.0.1", "fd00::/8")
    assert settings.default_policy() == Policy(max_waiting=50, max_wait=2.0)
    webhooks, search = settings.rules
    assert webhooks.methods == frozenset({"POST"})
    assert (webhooks.parallelism, webhooks.rate, webhooks.period) == (5, 100, 60.0)
    assert (search.rate, search.period, search.max_waiting, search.max_wait) == (10, 1.0, 0, 0.5)
    router = settings.router()
    assert isinstance(router, Router)
    assert router.rules == settings.rules
    assert router.trust_policy_headers is False
    assert router.trusts("127.0.0.1")
    assert problems_of(path) == []


# -- validation -----------------------------------------------------------------------------------------------------


def test_check_names_every_bad_field_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstream = "http://127.0.0.1:8000"
        port = "8080"
        colour = "blue"
        max_body = "ten megabytes"

        [defaults]
        max_wait = -1

        [[rules]]
        name = "a"
        key = "a"

        [[rules]]
        name = "b"
        key = "tenant:{header:X-Tenant-Id}"
        period = "10x"
        parallelism = 0
        burst = 3
        """,
    )
    problems = problems_of(path)
    assert problems == [
        f'{path}:2: port must be an integer from 1 to 65535, got a string ("8080")',
        f'{path}:3: unknown setting "colour"; known settings: ' + problems[1].split("known settings: ")[1],
        f'{path}:4: max_body must be a size such as 512KB or 10MB, got "ten megabytes"',
        f"{path}:7: defaults.max_wait must be a non-negative duration, got -1",
        f'{path}:16: rules[1].period must be a duration such as 500ms, 10s or 1h30m, got "10x"',
        f"{path}:17: rules[1].parallelism must be an integer from 1 to 1000000000, got 0",
        f'{path}:18: unknown setting "rules[1].burst"; a rule takes '
        "name, path, methods, host, key, parallelism, rate, period, max_waiting, max_wait",
    ]


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("[[rules]]\nkey = 'k'\nperiod = '8d'\n", 3, "rules[0].period must be above 0s and at most 7d"),
        ("[[rules]]\nkey = 'k'\nrate = 'ten per second'\n", 3, 'rate must look like "10/second"'),
        ("[[rules]]\nkey = 'k'\nrate = '5/minute'\nperiod = '1s'\n", 4, "already sets the period"),
        ("[[rules]]\nkey = 'k'\nmethods = 'POST'\n", 3, "rules[0].methods must be a non-empty list"),
        ("[[rules]]\nkey = 'k'\npath = 'hooks'\n", 3, 'rules[0].path must be a path prefix starting with "/"'),
        ("[[rules]]\nname = 'x'\n", 1, "rules[0] needs a key"),
        ("[[rules]]\nkey = 'tenant:{header:}'\n", 2, "rules[0]: key: placeholder"),
        ("[[rules]]\nkey = 'tenant:{nope}'\n", 2, 'unknown placeholder "{nope}"'),
        ("[[rules]]\nname='a'\nkey='a'\n[[rules]]\nname='a'\nkey='b'\n", 5, "is already the name of rules[0]"),
        ("rules = 3\n", 1, "rules must be an array of tables"),
        ("defaults = 3\n", 1, "defaults must be a table"),
        ("[defaults]\nparallelism = 3\n", 2, 'unknown setting "defaults.parallelism"'),
        ("upstream = 'ftp://x'\n", 1, 'upstream must be a URL such as http://127.0.0.1:8000, got "ftp://x"'),
        ("upstream = 'http://x:1/api'\n", 1, "without a path or query"),
        ("store = 'mongo://x'\n", 1, 'store URI "mongo://x" must start with memory://'),
        ("store = 'redis://host:notaport'\n", 1, 'port must be a number from 1 to 65535, got "notaport"'),
        ("lease_ttl = '500ms'\n", 1, "lease_ttl must be at least 1s"),
        ("workers = 0\n", 1, "workers must be an integer from 1 to 256, got 0"),
        ("log_level = 'loud'\n", 1, "log_level must be one of critical, error, warning, info, debug, trace"),
        ("trust_policy_headers = 'yes'\n", 1, "trust_policy_headers must be true or false, got a string"),
        ("trusted_proxies = ['10.0.0.0/33']\n", 1, "trusted_proxies[0] must be an IP address or CIDR network"),
        ("host = 'not a host'\n", 1, "host must be an IP address or a host name"),
        ("port = true\n", 1, "port must be an integer from 1 to 65535, got a boolean (true)"),
    ],
)
def test_each_bad_value_names_field_and_line(tmp_path: Path, text: str, line: int, expected: str) -> None:
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line}: ")
    assert expected in problems[0]


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "http://x:1"\nport = = 3\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:2: invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    (problem,) = problems_of(path)
    assert problem == f"{path}: cannot read the config file: No such file or directory"
    with pytest.raises(ConfigProblems, match="cannot read the config file"):
        load_settings({"config": path}, {})


def test_serve_reports_the_first_problem_and_counts_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 'x'\nadmin_port = 'y'\nworkers = 'z'\n")
    with pytest.raises(ConfigProblems) as caught:
        load_settings({"config": path}, {})
    assert len(caught.value.problems) == 3
    assert str(caught.value).startswith(f"{path}:1: port must be an integer")
    assert str(caught.value).endswith("(and 2 more problems)")
    assert "\n" not in str(caught.value)


def test_env_and_flag_problems_name_their_source() -> None:
    with pytest.raises(ConfigProblems) as caught:
        load_settings({"port": "80a", "upstream": "http://x:1"}, {"FLOWGATE_LEASE_TTL": "forever"})
    assert [str(p) for p in caught.value.problems] == [
        'FLOWGATE_LEASE_TTL: lease_ttl must be a duration such as 500ms, 10s or 1h30m, got "forever"',
        '--port: port must be an integer from 1 to 65535, got "80a"',
    ]


def test_workers_need_a_shared_store() -> None:
    with pytest.raises(ConfigProblems) as caught:
        load_settings({**UPSTREAM, "workers": "4"}, {})
    message = str(caught.value)
    assert message.startswith("--workers: workers = 4 needs a shared store")
    assert "memory:// store lives inside one process" in message
    settings = load_settings({**UPSTREAM, "workers": "4", "store": "redis://127.0.0.1:6379/0"}, {})
    assert settings.workers == 4


def test_upstream_is_required_to_serve_only() -> None:
    with pytest.raises(ConfigProblems, match="no upstream: pass --upstream URL"):
        load_settings({}, {})
    assert load_settings({}, {}, require_upstream=False).upstream is None


def test_port_collision() -> None:
    with pytest.raises(ConfigProblems, match="port and admin_port are both 9000"):
        load_settings({**UPSTREAM, "port": "9000", "admin_port": "9000"}, {})
    settings = load_settings({**UPSTREAM, "port": "9000", "admin_port": "9000", "admin_host": "127.0.0.2"}, {})
    assert settings.admin_host == "127.0.0.2"


def test_unknown_environment_variables_are_reported() -> None:
    env = {"FLOWGATE_UPSTREEM": "x", "FLOWGATE_PORT": "1", "FLOWGATE_CONFIG": "f", "PATH": "/bin"}
    assert unknown_env_vars(env) == ["FLOWGATE_UPSTREEM"]


def test_key_lines_scanner() -> None:
    text = textwrap.dedent(
        """
        # comment
        upstream = "x"   # trailing
        "port" = 1
        [defaults]
        max_wait = "1s"
        [[rules]]
        key = "a"
        [[ rules ]]
        description = '''
        [[rules]]
        fake = 1
        '''
        period = "1s"
        """
    )
    lines = key_lines(text)
    assert lines["upstream"] == 3
    assert lines["port"] == 4
    assert lines["defaults"] == 5
    assert lines["defaults.max_wait"] == 6
    assert lines["rules[0]"] == 7
    assert lines["rules[0].key"] == 8
    assert lines["rules[1]"] == 9
    assert lines["rules[1].period"] == 14
    assert "rules[2]" not in lines


# -- secrets --------------------------------------------------------------------------------------------------------


def test_repr_masks_token_and_store_password() -> None:
    settings = load_settings(
        {**UPSTREAM, "admin_token": "tok-very-secret", "store": "redis://user:hunter2@db.internal:6380/1"}, {}
    )
    shown = repr(settings)
    assert "tok-very-secret" not in shown
    assert "hunter2" not in shown
    assert "admin_token='***'" in shown
    assert "store='redis://user:***@db.internal:6380/1'" in shown
    assert str(settings) == shown
    assert settings.admin_token == "tok-very-secret"  # the value itself is intact
    assert "admin_token=None" in repr(Settings())


def test_errors_never_echo_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems) as caught:
        load_settings({**UPSTREAM, "store": "redis://user:hunter2@db.internal:notaport/0"}, {})
    assert "hunter2" not in str(caught.value)
    assert "redis://user:***@db.internal:notaport/0" in str(caught.value)

    with pytest.raises(ConfigProblems) as caught:
        load_settings({"upstream": "http://user:hunter2@app:80"}, {})
    assert "hunter2" not in str(caught.value)
    assert "must not carry credentials" in str(caught.value)

    with pytest.raises(ConfigProblems) as caught:
        load_settings({**UPSTREAM, "admin_token": "has space hunter2"}, {})
    assert "hunter2" not in str(caught.value)
    assert "admin_token must be non-empty printable ASCII" in str(caught.value)

    path = write(tmp_path, "admin_token = 12345678\nstore = 'rediss://:hunter2@h:x/0'\n")
    problems = problems_of(path)
    assert len(problems) == 2
    assert not any("hunter2" in problem or "12345678" in problem for problem in problems)
