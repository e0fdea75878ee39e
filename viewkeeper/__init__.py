"""viewkeeper: keep Redis caches and OpenSearch indexes exactly in sync with DynamoDB Streams.

The public API is what a view module needs::

    from viewkeeper import redis_view, opensearch_view, Value, HashField, SetMember, SortedSetMember
    from viewkeeper import Counter, SortedSetCounter  # exact sums per group (aggregates)
    from viewkeeper import changelog_view, StreamChange  # views of the changes themselves
"""

from viewkeeper.projection.api import View, opensearch_view, redis_view
from viewkeeper.projection.changelog import StreamChange, changelog_view
from viewkeeper.projection.entries import (
    Counter,
    HashField,
    SetMember,
    SortedSetCounter,
    SortedSetMember,
    Value,
)

__version__ = "0.1.0"

__all__ = [
    "Counter",
    "HashField",
    "SetMember",
    "SortedSetCounter",
    "SortedSetMember",
    "StreamChange",
    "Value",
    "View",
    "__version__",
    "changelog_view",
    "opensearch_view",
    "redis_view",
]
