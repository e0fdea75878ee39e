"""The config file: YAML → frozen, validated dataclasses.

Every mistake is a :class:`ConfigError` whose message is one line: the file (and line, when
the YAML tells it), the key path, the bad value, and the fix. Nothing is half-checked at
load and failing later: URLs are parsed, files exist, environment variables are set.

Secrets (passwords) are read at load time from the environment (``password_env``), a file
(``password_file``) or a systemd credential (``password_credential``, from
``LoadCredential=``, found in ``$CREDENTIALS_DIRECTORY``), or taken from a Redis URL, and
held in :class:`Secret`, whose repr and str are ``'***'``: a Config may be printed, logged or
put in an error whole. Each secret is also registered with :mod:`viewkeeper.ops.logs`, which
masks it in any log line that still manages to contain it.

Relative paths in the file (``password_file``, ``ssl_ca_file``, ``ca_certs``) are relative to
the config file's folder, not the working directory, so the unit file and a shell agree.

The modules, in the order a file goes through them:

- :mod:`~viewkeeper.config.model`: the shape (dataclasses, defaults), ``ConfigError``, ``Secret``;
- :mod:`~viewkeeper.config.loading`: ``load_config``/``parse_config``, YAML and line numbers;
- :mod:`~viewkeeper.config.sections`: one builder per section (``aws``, ``views``, ``worker``…);
- :mod:`~viewkeeper.config.connections`: the ``redis:`` and ``opensearch:`` connections;
- :mod:`~viewkeeper.config.urls`: URL checks that never echo a password;
- :mod:`~viewkeeper.config.validation`: typed getters for one mapping's keys, secrets reading;
- :mod:`~viewkeeper.config.messages`: the words of an error (values shown masked, did you mean);
- :mod:`~viewkeeper.config.checks`: after the views are loaded (connections, ``redacted``).
"""

from viewkeeper.config.checks import check_view_connections, redacted
from viewkeeper.config.loading import load_config, parse_config
from viewkeeper.config.model import (
    AwsConfig,
    BasicAuth,
    Config,
    ConfigError,
    CoordinationConfig,
    LoggingConfig,
    MetricsConfig,
    OpenSearchConnection,
    RedisConnection,
    Secret,
    SigV4Auth,
    TableConfig,
    TombstoneConfig,
    WorkerConfig,
)

__all__ = [
    "AwsConfig",
    "BasicAuth",
    "Config",
    "ConfigError",
    "CoordinationConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OpenSearchConnection",
    "RedisConnection",
    "Secret",
    "SigV4Auth",
    "TableConfig",
    "TombstoneConfig",
    "WorkerConfig",
    "check_view_connections",
    "load_config",
    "parse_config",
    "redacted",
]
