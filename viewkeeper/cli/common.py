"""What every command does first: load the config and the views, set up logging, and say
where DynamoDB is in messages."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from viewkeeper.cli import failures
from viewkeeper.cli.failures import _host_port

log = logging.getLogger("viewkeeper.cli")


def _app(args: argparse.Namespace) -> Any:
    from viewkeeper.app import App
    from viewkeeper.ops.logs import setup_logging

    app = App.from_file(args.config)
    setup_logging(app.config.logging.format, app.config.logging.level)
    aws = app.config.aws
    failures.dynamodb_where = (
        f"DynamoDB at {_host_port(aws.endpoint_url)}"
        if aws.endpoint_url
        else f"DynamoDB ({aws.region})"
    )
    for warning in app.warnings:
        log.warning("%s", warning)
    return app
