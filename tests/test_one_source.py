"""#19 through the real command, moto and the real OpenSearch node: two deployments (two
configs, two tables, two coordination tables) declaring one index. The second is refused at
start — `run`, `check` and `rebuild` — in one line naming both owners and the fix, and
writes nothing; `rebuild --take-over` moves the index to it and refuses the first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import vk, write_config


def put(db: Any, table: str, pk: str, n: int) -> None:
    db.put_item(TableName=table, Item={"pk": {"S": pk}, "n": {"N": str(n)}})


def docs(os_client: Any, index: str) -> dict[str, Any]:
    os_client.indices.refresh(index=index)
    hits = os_client.search(index=index, body={"size": 100})["hits"]["hits"]
    return {h["_id"]: {k: v for k, v in h["_source"].items() if k != "_vk"} for h in hits}


@pytest.fixture
def deployments(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    dynamodb_url: str,
    opensearch_url: str,
    os_client: Any,
    os_prefix: str,
) -> tuple[Path, Path]:
    made = []
    for side in ("a", "b"):
        make_table(dynamodb, f"ns-orders-{side}", hash_key="pk")
        folder = tmp_path / side
        folder.mkdir()
        made.append(
            write_config(
                folder,
                dynamodb_url=dynamodb_url,
                views=[f"tests.views_e2e.shared_index_{side}"],
                tables={f"ns-orders-{side}": {"starting_position": "TRIM_HORIZON"}},
                opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
            )
        )
    return made[0], made[1]


def test_a_second_deployment_on_the_same_index_is_refused_and_writes_nothing(
    deployments: tuple[Path, Path], dynamodb: Any, os_client: Any, os_prefix: str
) -> None:
    a, b = deployments
    for i in range(3):
        put(dynamodb, "ns-orders-a", f"o-{i}", i)
        put(dynamodb, "ns-orders-b", f"o-{i}", 100 + i)  # the same ids, other versions
    first = vk("run", "-c", str(a), "--until-caught-up")
    assert first.returncode == 0, first.stderr
    before = docs(os_client, f"{os_prefix}shared")
    assert before == {f"o-{i}": {"from": "a", "n": i} for i in range(3)}

    for command in (["run", "--until-caught-up"], ["rebuild", "shared_docs"]):
        refused = vk(*command, "-c", str(b))
        assert refused.returncode == 78, refused.stdout + refused.stderr
        (line,) = [x for x in refused.stderr.splitlines() if x.startswith("viewkeeper:")]
        assert "refusing to write" in line and "index 'shared'" in line
        assert "table/ns-orders-a" in line and "table/ns-orders-b" in line
        assert "--take-over" in line
    checked = vk("check", "-c", str(b))
    assert checked.returncode == 1 and "FAILED: view shared_docs: refusing" in checked.stdout
    assert "table/ns-orders-a" in checked.stdout and "1 check(s) failed" in checked.stdout
    assert docs(os_client, f"{os_prefix}shared") == before  # nothing written


def test_take_over_moves_the_index_to_the_second_deployment_and_refuses_the_first(
    deployments: tuple[Path, Path], dynamodb: Any, os_client: Any, os_prefix: str
) -> None:
    a, b = deployments
    put(dynamodb, "ns-orders-a", "o-1", 1)
    put(dynamodb, "ns-orders-a", "o-2", 2)
    put(dynamodb, "ns-orders-b", "o-9", 9)
    assert vk("run", "-c", str(a), "--until-caught-up").returncode == 0
    taken = vk("rebuild", "shared_docs", "-c", str(b), "--take-over", "--take-over-grace", "0")
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert "taken over from table" in taken.stdout and "ns-orders-a" in taken.stdout
    assert docs(os_client, f"{os_prefix}shared") == {"o-9": {"from": "b", "n": 9}}
    put(dynamodb, "ns-orders-a", "o-3", 3)
    refused = vk("run", "-c", str(a), "--until-caught-up")
    assert refused.returncode == 78 and "table/ns-orders-b" in refused.stderr
    assert vk("run", "-c", str(b), "--until-caught-up").returncode == 0
    assert docs(os_client, f"{os_prefix}shared") == {"o-9": {"from": "b", "n": 9}}
