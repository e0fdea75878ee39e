"""Helpers for DynamoDB tables on moto."""

from __future__ import annotations

from typing import Any

REGION = "us-east-1"
ACCESS_KEY = SECRET_KEY = "testing"


def boto3_client(service: str, endpoint_url: str) -> Any:
    """A boto3 client on moto: region us-east-1, dummy credentials, few retries."""
    import boto3
    from botocore.config import Config

    make_client: Any = boto3.client  # the stubs only accept literal service names
    return make_client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5),
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def make_table(
    dynamodb: Any,
    name: str,
    hash_key: str = "pk",
    range_key: str | None = None,
    stream: bool = True,
    *,
    hash_type: str = "S",
    range_type: str = "S",
) -> tuple[str, str]:
    """Create a PAY_PER_REQUEST table, with a NEW_AND_OLD_IMAGES stream unless stream=False.

    Returns (table_name, stream_arn); stream_arn is "" without a stream.
    """
    attributes = [{"AttributeName": hash_key, "AttributeType": hash_type}]
    schema = [{"AttributeName": hash_key, "KeyType": "HASH"}]
    if range_key is not None:
        attributes.append({"AttributeName": range_key, "AttributeType": range_type})
        schema.append({"AttributeName": range_key, "KeyType": "RANGE"})
    kwargs: dict[str, Any] = {
        "TableName": name,
        "AttributeDefinitions": attributes,
        "KeySchema": schema,
        "BillingMode": "PAY_PER_REQUEST",
    }
    if stream:
        kwargs["StreamSpecification"] = {
            "StreamEnabled": True,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
    table = dynamodb.create_table(**kwargs)["TableDescription"]
    dynamodb.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    return name, str(table.get("LatestStreamArn", "")) if stream else ""
