"""The config file: the documented shape loads, every mistake is one clear line, and no
secret ever shows in a repr, an error or the `check` display."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import registry_of
from viewkeeper.app import App
from viewkeeper.config import (
    BasicAuth,
    Config,
    ConfigError,
    Secret,
    SigV4Auth,
    check_view_connections,
    load_config,
    parse_config,
    redacted,
)
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.ops.logs import redact
from viewkeeper.projection.api import View
from viewkeeper.runtime.supervisor import SupervisorSettings
from viewkeeper.runtime.worker import WorkerSettings
from viewkeeper.stream.fake import FakeStream

REPO = Path(__file__).resolve().parent.parent

CONFIG_EXAMPLE = """\
aws: {region: us-east-1, endpoint_url: http://127.0.0.1:8000}   # endpoint_url optional
tables:
  orders: {starting_position: TRIM_HORIZON}                     # or LATEST (default)
views: [views.orders]                                           # modules to import
redis:
  cache: {url: "redis://127.0.0.1:6379/0"}
opensearch:
  search: {hosts: ["http://127.0.0.1:9200"]}
coordination: {table: viewkeeper-coordination}
worker: {poll_interval: 0.25, batch_size: 1000, on_error: deadletter, lease_duration: 10.0,
         worker_id: null}
tombstones: {retention_hours: 48}
metrics: {port: 9464, host: 127.0.0.1}
logging: {format: text, level: INFO}
"""

PASSWORD = "Tr0ub4dor&3-horse"


def write(tmp_path: Path, text: str, name: str = "viewkeeper.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"aws": {"region": "us-east-1"}, "views": ["views.orders"]}
    data.update(sections)
    return data


def error_of(data: Any, environ: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", environ=environ or {}, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("test.yaml"), message
    return message


# --- the documented shape ---------------------------------------------------------------


def test_the_documented_example_loads_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONFIG_EXAMPLE), environ={})
    assert config.aws.region == "us-east-1"
    assert config.aws.endpoint_url == "http://127.0.0.1:8000"
    assert config.tables["orders"].starting_position == "TRIM_HORIZON"
    assert config.views == ("views.orders",)
    assert config.redis["cache"].url == "redis://127.0.0.1:6379/0"
    assert config.redis["cache"].password is None
    assert config.opensearch["search"].hosts == ("http://127.0.0.1:9200",)
    assert config.coordination.table == "viewkeeper-coordination"
    assert config.worker.on_error == "deadletter"
    assert config.worker.batch_size == 1000
    assert config.worker.worker_id is None
    assert config.tombstones.retention_seconds == 48 * 3600
    assert config.metrics.port == 9464
    assert config.logging.format == "text"
    assert config.source == str(tmp_path / "viewkeeper.yaml")
    assert config.search_path == (str(tmp_path),)


def test_defaults_fill_everything_optional() -> None:
    config = parse_config(minimal(), environ={})
    assert config.redis == {} and config.opensearch == {} and config.tables == {}
    assert config.coordination.table == "viewkeeper-coordination"
    assert config.coordination.create_if_missing is True
    assert config.worker.poll_interval == 0.25
    assert config.worker.lease_duration == 10.0
    assert config.tombstones.retention_hours == 48
    assert config.metrics.host == "127.0.0.1"
    assert config.logging.level == "INFO"


def test_renew_threads_defaults_to_the_supervisors_own_default() -> None:
    config = parse_config(minimal(), environ={})
    assert config.worker.renew_threads == SupervisorSettings().renew_threads == 8


def supervisor_settings(worker: dict[str, Any]) -> SupervisorSettings:
    """The settings the daemon's supervisor gets from a config with this ``worker:``."""
    config = parse_config(
        minimal(worker=worker, redis={"cache": {"url": "redis://h/0"}}), environ={}
    )
    app = App(
        config,
        registry=registry_of(redis_view("cache")),
        client=FakeStream(),
        store=MemoryStore(),
        sinks={},
    )
    return app.supervisor().settings


def test_worker_renew_threads_reaches_the_supervisor() -> None:
    assert supervisor_settings({"renew_threads": 3}).renew_threads == 3


def test_worker_prefetch_is_on_by_default_and_reaches_the_shard_workers() -> None:
    assert parse_config(minimal(), environ={}).worker.prefetch is WorkerSettings().prefetch is True
    for value in (False, True):
        assert supervisor_settings({"prefetch": value}).worker.prefetch is value


def test_worker_prefetch_must_be_true_or_false() -> None:
    message = error_of(minimal(worker={"prefetch": "yes please"}))
    assert "worker.prefetch: 'yes please' is a string, not true or false" in message


def test_redis_and_opensearch_defaults() -> None:
    config = parse_config(
        minimal(
            redis={"cache": {"url": "redis://127.0.0.1:6379/0"}},
            opensearch={"search": {"hosts": ["https://search:9200"]}},
        ),
        environ={},
    )
    cache = config.redis["cache"]
    assert (cache.key_prefix, cache.owner_buckets, cache.tls) == ("vk:", 4096, False)
    search = config.opensearch["search"]
    assert search.verify_certs is True
    assert search.auth is None
    assert search.index_prefix == ""


def test_an_unlisted_table_gets_the_defaults() -> None:
    config = parse_config(minimal(), environ={})
    assert config.table("orders").starting_position == "LATEST"


def test_the_shipped_systemd_example_loads_with_its_credentials(tmp_path: Path) -> None:
    (tmp_path / "redis-password").write_text("redis-secret\n")
    (tmp_path / "opensearch-password").write_text("os-secret")
    config = load_config(
        REPO / "systemd" / "viewkeeper.yaml", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    cache = config.redis["cache"]
    assert cache.tls and cache.ssl_cert_reqs == "required" and cache.ssl_check_hostname
    assert cache.password is not None and cache.password.reveal() == "redis-secret"
    auth = config.opensearch["search"].auth
    assert isinstance(auth, BasicAuth) and auth.password.reveal() == "os-secret"


def test_case_is_forgiven_for_enums() -> None:
    config = parse_config(
        minimal(
            tables={"orders": {"starting_position": "trim_horizon"}},
            logging={"format": "JSON", "level": "debug"},
        ),
        environ={},
    )
    assert config.tables["orders"].starting_position == "TRIM_HORIZON"
    assert (config.logging.format, config.logging.level) == ("json", "DEBUG")


def test_metrics_port_null_turns_the_endpoint_off() -> None:
    assert parse_config(minimal(metrics={"port": None}), environ={}).metrics.port is None


def test_region_falls_back_to_the_environment() -> None:
    data = {"views": ["views.orders"]}
    config = parse_config(data, environ={"AWS_REGION": "eu-west-1"})
    assert config.aws.region == "eu-west-1"


# --- one clear line per mistake -----------------------------------------------------------


def test_unknown_key_suggests_the_closest_known_key(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG_EXAMPLE.replace("poll_interval", "poll_intervall"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}:10: worker.poll_intervall: unknown key")
    assert "did you mean 'poll_interval'?" in message


def test_unknown_top_level_key_suggests_views() -> None:
    message = error_of({"aws": {"region": "us-east-1"}, "view": ["views.orders"]})
    assert "view: unknown key; did you mean 'views'?" in message


def test_unknown_nested_key_names_the_full_path() -> None:
    message = error_of(minimal(redis={"cache": {"url": "redis://h/0", "key_prefx": "x"}}))
    assert "redis.cache.key_prefx: unknown key; did you mean 'key_prefix'?" in message


def test_wrong_type_names_key_value_and_fix() -> None:
    message = error_of(minimal(worker={"batch_size": "many"}))
    assert "worker.batch_size: 'many' is a string, not an integer" in message
    assert "write it like batch_size: 1000" in message


def test_a_yaml_boolean_is_not_a_number() -> None:
    message = error_of(minimal(worker={"batch_size": True}))
    assert "worker.batch_size: True is a boolean, not an integer" in message


def test_bad_enum_value_lists_the_choices() -> None:
    message = error_of(minimal(worker={"on_error": "dead-letter"}))
    assert "worker.on_error: 'dead-letter' is not allowed; use deadletter or halt" in message
    assert "did you mean 'deadletter'?" in message


def test_worker_processes_is_one_by_default_a_number_or_auto() -> None:
    assert parse_config(minimal(), environ={}).worker.processes == 1
    assert parse_config(minimal(worker={"processes": 4}), environ={}).worker.processes == 4
    for auto in ("auto", "AUTO", " auto "):
        config = parse_config(minimal(worker={"processes": auto}), environ={})
        assert config.worker.processes == "auto"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (0, "worker.processes: 0 is out of range"),
        (-2, "worker.processes: -2 is out of range"),
        (1000, "worker.processes: 1000 is out of range"),
        ("four", "worker.processes: 'four' is a string, not a number of processes"),
        ("2", "worker.processes: '2' is a string, not a number of processes"),
        (True, "worker.processes: True is a boolean, not a number of processes"),
        (1.5, "worker.processes: 1.5 is a number, not a number of processes"),
    ],
)
def test_a_bad_worker_processes_names_the_key_the_value_and_the_fix(value: Any, says: str) -> None:
    message = error_of(minimal(worker={"processes": value}))
    assert says in message, message
    assert "use a whole number from 1 to 256, or auto" in message, message


def test_bad_starting_position() -> None:
    message = error_of(minimal(tables={"orders": {"starting_position": "EARLIEST"}}))
    assert "tables.orders.starting_position: 'EARLIEST' is not allowed" in message
    assert "LATEST or TRIM_HORIZON" in message


def test_missing_views() -> None:
    message = error_of({"aws": {"region": "us-east-1"}})
    assert "views: is missing; add views: [views.orders]" in message


def test_empty_views_list() -> None:
    message = error_of(minimal(views=[]))
    assert "views: is empty; name at least one module" in message


def test_views_must_be_module_names() -> None:
    message = error_of(minimal(views=["views/orders.py"]))
    assert "views[0]: 'views/orders.py' is not a module name" in message


def test_missing_redis_url() -> None:
    message = error_of(minimal(redis={"cache": {"key_prefix": "x:"}}))
    assert "redis.cache.url: is missing" in message


def test_missing_region_without_environment() -> None:
    message = error_of({"views": ["views.orders"]})
    assert "aws.region: is missing" in message and "add aws: {region: us-east-1}" in message


def test_negative_durations_are_refused() -> None:
    message = error_of(minimal(worker={"poll_interval": -0.5}))
    assert "worker.poll_interval: -0.5 is not a valid duration" in message
    message = error_of(minimal(worker={"lease_duration": 0}))
    assert "worker.lease_duration: 0 is not a valid duration" in message
    message = error_of(minimal(redis={"cache": {"url": "redis://h/0", "socket_timeout": -1}}))
    assert "redis.cache.socket_timeout" in message


def test_renew_threads_below_one_names_the_line_and_the_fix(tmp_path: Path) -> None:
    text = CONFIG_EXAMPLE.replace("worker_id: null", "worker_id: null, renew_threads: 0")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:11: worker.renew_threads: 0 is out of range; use a whole number at least 1"
    )
    assert info.value.path == "worker.renew_threads"


def test_renew_threads_must_be_a_whole_number() -> None:
    message = error_of(minimal(worker={"renew_threads": "eight"}))
    assert "worker.renew_threads: 'eight' is a string, not an integer" in message
    assert "write it like renew_threads: 8" in message
    message = error_of(minimal(worker={"renew_threads": 2.5}))
    assert "worker.renew_threads: 2.5 is a number, not an integer" in message


def test_tombstones_must_outlive_the_stream() -> None:
    message = error_of(minimal(tombstones={"retention_hours": 12}))
    assert "tombstones.retention_hours: 12 is shorter than the 24 h stream retention" in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:6379/0", "does not start with redis:// or rediss:// or unix://"),
        ("redis://127.0.0.1:99999/0", "is not a valid URL"),
        ("redis:///0", "has no host"),
        ("redis://127.0.0.1:6379/cache", "names database 'cache'"),
    ],
)
def test_invalid_redis_urls(url: str, problem: str) -> None:
    message = error_of(minimal(redis={"cache": {"url": url}}))
    assert "redis.cache.url: " in message and problem in message


def test_invalid_opensearch_host() -> None:
    message = error_of(minimal(opensearch={"search": {"hosts": ["127.0.0.1:9200"]}}))
    assert "opensearch.search.hosts[0]: '127.0.0.1:9200' does not start with http://" in message


def test_opensearch_hosts_must_be_a_list() -> None:
    message = error_of(minimal(opensearch={"search": {"hosts": "http://h:9200"}}))
    assert "is a string, not a list; write it as hosts: ['http://h:9200']" in message


def test_invalid_endpoint_url() -> None:
    message = error_of({"aws": {"region": "us-east-1", "endpoint_url": "localhost:8000"}})
    assert "aws.endpoint_url:" in message


def test_password_env_that_is_not_set() -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "password_env": "VK_REDIS_PW"}})
    message = error_of(data)
    assert "redis.cache.password_env: environment variable 'VK_REDIS_PW' is not set" in message


def test_password_env_is_read() -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "password_env": "VK_REDIS_PW"}})
    config = parse_config(data, environ={"VK_REDIS_PW": PASSWORD})
    password = config.redis["cache"].password
    assert password is not None and password.reveal() == PASSWORD
    assert password.origin == "env VK_REDIS_PW"


def test_credential_file_that_does_not_exist(tmp_path: Path) -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "password_credential": "redis-password"}})
    message = error_of(data, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "redis.cache.password_credential: credential file" in message
    assert "redis-password' does not exist" in message


def test_credential_outside_systemd_says_what_to_do() -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "password_credential": "redis-password"}})
    message = error_of(data)
    assert "needs $CREDENTIALS_DIRECTORY, which is not set" in message
    assert "LoadCredential=redis-password:" in message


def test_password_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text(PASSWORD + "\n")
    path = write(
        tmp_path,
        """\
        aws: {region: us-east-1}
        views: [views.orders]
        redis:
          cache: {url: "redis://h:6379/0", password_file: secrets/redis}
        """,
    )
    password = load_config(path, environ={}).redis["cache"].password
    assert password is not None and password.reveal() == PASSWORD


def test_password_file_that_does_not_exist(tmp_path: Path) -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "password_file": "nope"}})
    message = error_of(data, base_dir=str(tmp_path))
    assert f"password file '{tmp_path / 'nope'}' does not exist" in message


def test_two_password_sources_are_refused() -> None:
    data = minimal(
        redis={"cache": {"url": "redis://h/0", "password_env": "A", "password_file": "/x"}}
    )
    message = error_of(data, environ={"A": "x"})
    assert "sets password_env and password_file" in message


def test_password_in_url_and_in_section_is_ambiguous() -> None:
    data = minimal(redis={"cache": {"url": f"redis://:{PASSWORD}@h/0", "password_env": "A"}})
    message = error_of(data, environ={"A": "other-secret"})
    assert "has a password and so does the section" in message
    assert PASSWORD not in message


def test_tls_options_need_a_tls_url() -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "ssl_cert_reqs": "required"}})
    message = error_of(data)
    assert "redis.cache.ssl_cert_reqs: is set but the URL 'redis://h/0' is not TLS" in message


def test_ca_file_must_exist(tmp_path: Path) -> None:
    data = minimal(redis={"cache": {"url": "rediss://h/0", "ssl_ca_file": "/no/such/ca.pem"}})
    message = error_of(data)
    assert "redis.cache.ssl_ca_file: CA file '/no/such/ca.pem' does not exist" in message


def test_inline_password_points_to_the_secret_keys() -> None:
    data = minimal(
        opensearch={
            "search": {
                "hosts": ["https://h:9200"],
                "auth": {"type": "basic", "username": "u", "password": PASSWORD},
            }
        }
    )
    message = error_of(data)
    assert "opensearch.search.auth.password: unknown key" in message
    assert "use password_env, password_file or password_credential" in message
    assert PASSWORD not in message


def test_opensearch_host_with_credentials_is_refused_without_echoing_them() -> None:
    data = minimal(opensearch={"search": {"hosts": [f"https://admin:{PASSWORD}@h:9200"]}})
    message = error_of(data)
    assert "carries credentials" in message and "auth: {type: basic" in message
    assert PASSWORD not in message and "admin:***@h" in message


def test_auth_type_must_be_basic_or_sigv4() -> None:
    data = minimal(opensearch={"search": {"hosts": ["https://h"], "auth": {"type": "sigv5"}}})
    message = error_of(data)
    assert "opensearch.search.auth.type: is 'sigv5'" in message
    assert "did you mean 'sigv4'?" in message


def test_sigv4_region_defaults_to_the_aws_region() -> None:
    data = minimal(
        opensearch={"search": {"hosts": ["https://h"], "auth": {"type": "sigv4"}}},
    )
    auth = parse_config(data, environ={}).opensearch["search"].auth
    assert auth == SigV4Auth(region="us-east-1", service="es")
    data["opensearch"]["search"]["auth"] = {
        "type": "sigv4",
        "region": "eu-west-1",
        "service": "aoss",
    }
    auth = parse_config(data, environ={}).opensearch["search"].auth
    assert auth == SigV4Auth(region="eu-west-1", service="aoss")


def test_a_key_written_twice_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        aws: {region: us-east-1}
        views: [views.orders]
        worker:
          batch_size: 100
          batch_size: 200
        """,
    )
    with pytest.raises(ConfigError, match=r":5: worker.batch_size: is written twice"):
        load_config(path, environ={})


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "aws: {region: us-east-1\nviews: [a]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    assert "not valid YAML" in message


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"config file not found; pass the right path"):
        load_config("/no/such/viewkeeper.yaml")


def test_section_that_is_not_a_mapping() -> None:
    message = error_of(minimal(worker=["poll_interval", 1]))
    assert "worker: must be a mapping, got a list" in message


def test_error_names_the_line_of_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG_EXAMPLE.replace("on_error: deadletter", "on_error: skip"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:10: worker.on_error: 'skip' is not allowed")
    assert info.value.path == "worker.on_error"


# --- secrets never show ----------------------------------------------------------------


def test_secret_prints_as_stars() -> None:
    secret = Secret(PASSWORD, "env X")
    assert repr(secret) == "'***'" and str(secret) == "***" and f"{secret}" == "***"
    assert secret.reveal() == PASSWORD


def test_a_password_in_the_redis_url_is_moved_out_of_it() -> None:
    data = minimal(redis={"cache": {"url": f"redis://default:{PASSWORD}@h:6379/0"}})
    cache = parse_config(data, environ={}).redis["cache"]
    assert cache.url == "redis://default@h:6379/0"
    assert cache.password is not None and cache.password.reveal() == PASSWORD
    assert cache.password.origin == "url"


def test_percent_encoded_url_password_is_decoded() -> None:
    data = minimal(redis={"cache": {"url": "redis://:p%40ss%2Fword@h:6379/0"}})
    cache = parse_config(data, environ={}).redis["cache"]
    assert cache.password is not None and cache.password.reveal() == "p@ss/word"


def _config_with_every_secret(tmp_path: Path) -> Config:
    (tmp_path / "os-password").write_text("os-" + PASSWORD)
    data = minimal(
        redis={
            "cache": {"url": f"redis://:{PASSWORD}@h:6379/0"},
            "other": {"url": "rediss://h2:6380/0", "password_env": "VK_PW"},
        },
        opensearch={
            "search": {
                "hosts": ["https://h:9200"],
                "auth": {
                    "type": "basic",
                    "username": "vk",
                    "password_credential": "os-password",
                },
            }
        },
    )
    environ = {"VK_PW": "env-" + PASSWORD, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    return parse_config(data, "test.yaml", environ=environ)


def test_no_secret_in_the_config_repr(tmp_path: Path) -> None:
    config = _config_with_every_secret(tmp_path)
    for text in (repr(config), str(config), repr(config.redis), str(config.opensearch)):
        assert PASSWORD not in text
    assert "password='***'" in repr(config.redis["cache"])


def test_redacted_shows_stars_for_secrets(tmp_path: Path) -> None:
    config = _config_with_every_secret(tmp_path)
    shown = redacted(config)
    assert PASSWORD not in repr(shown)
    assert shown["redis"]["cache"]["password"] == "***"
    assert shown["redis"]["other"]["password"] == "***"
    assert shown["opensearch"]["search"]["auth"]["password"] == "***"
    assert shown["opensearch"]["search"]["auth"]["username"] == "vk"
    assert shown["worker"]["batch_size"] == 1000


def test_secrets_are_registered_for_log_masking(tmp_path: Path) -> None:
    _config_with_every_secret(tmp_path)
    line = f"connecting with {PASSWORD}, env-{PASSWORD} and os-{PASSWORD}"
    assert PASSWORD not in redact(line)


def test_an_error_after_the_url_never_echoes_its_password() -> None:
    data = minimal(redis={"cache": {"url": f"redis://:{PASSWORD}@h:6379/zero"}})
    message = error_of(data)
    assert PASSWORD not in message and "redis://:***@h:6379/zero" in message


def test_an_unknown_key_error_never_echoes_its_value() -> None:
    data = minimal(redis={"cache": {"url": "redis://h/0", "pasword_env": PASSWORD}})
    message = error_of(data)
    assert PASSWORD not in message and "did you mean 'password_env'?" in message


# --- views against the config ------------------------------------------------------------


def order_card(item: dict[str, Any]) -> None:
    return None


def order_doc(item: dict[str, Any]) -> None:
    return None


def redis_view(connection: str, table: str = "orders") -> View:
    return View("order_card", table, "redis", connection, order_card, module="views.orders")


def search_view(connection: str) -> View:
    return View("order_doc", "orders", "opensearch", connection, order_doc, "views.orders")


def two_sinks() -> Config:
    return parse_config(
        minimal(
            redis={"cache": {"url": "redis://h/0"}},
            opensearch={"search": {"hosts": ["http://h:9200"]}},
        ),
        "vk.yaml",
        environ={},
    )


def test_a_view_naming_an_undeclared_redis_connection_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        check_view_connections(two_sinks(), registry_of(redis_view("cache2")))
    assert str(info.value) == (
        "vk.yaml: view order_card (views.orders.order_card) uses redis='cache2', but the "
        "config declares redis: [cache]; add redis.cache2 or fix the view"
    )


def test_a_view_naming_an_undeclared_opensearch_connection_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"opensearch='serch'.*add opensearch.serch"):
        check_view_connections(two_sinks(), registry_of(search_view("serch")))


def test_declared_connections_and_unlisted_tables_are_fine() -> None:
    registry = registry_of(redis_view("cache", table="customers"), search_view("search"))
    assert check_view_connections(two_sinks(), registry) == []


def test_unused_tables_and_connections_are_warnings() -> None:
    config = parse_config(
        minimal(
            tables={"orders": {}, "legacy": {}},
            redis={"cache": {"url": "redis://h/0"}, "spare": {"url": "redis://h/1"}},
        ),
        "vk.yaml",
        environ={},
    )
    warnings = check_view_connections(config, registry_of(redis_view("cache")))
    assert warnings == [
        "vk.yaml: tables.legacy is declared but no view reads it; it will not be tailed",
        "vk.yaml: redis.spare is declared but no view uses it",
    ]


def test_the_repository_views_match_the_documented_config(tmp_path: Path) -> None:
    from viewkeeper.projection.registry import load_views

    config = load_config(write(tmp_path, CONFIG_EXAMPLE), environ={})
    registry = load_views(config.views, search_path=(str(REPO),))
    assert check_view_connections(config, registry) == []
