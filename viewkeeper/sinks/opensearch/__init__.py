"""The OpenSearch sink: one document per item, versioned, with tombstones readers never see.

Why it is built the way it is — the index layout, the stored script, the phases of a batch,
owner records and tombstones, custom document ids and claims, outcomes and errors, cost — is
argued in ``README.md`` beside these modules; § Where the code is maps its sections to them.
This module only gathers the package's names.
"""

from viewkeeper.sinks.opensearch.layout import (
    ID_DIGEST_PREFIX,
    LIVE_SUFFIX,
    MAX_ID_BYTES,
    OWNERS_SUFFIX,
    SCRIPT_NAME,
    ViewIndexes,
    item_id,
    script_source,
)
from viewkeeper.sinks.opensearch.layout import LIVE_MAPPINGS as LIVE_MAPPINGS
from viewkeeper.sinks.opensearch.plans import _Check as _Check
from viewkeeper.sinks.opensearch.plans import _Live as _Live
from viewkeeper.sinks.opensearch.plans import _Plan as _Plan
from viewkeeper.sinks.opensearch.sink import OpenSearchSink
from viewkeeper.sinks.opensearch.transport import OrjsonSerializer, make_client
from viewkeeper.sinks.opensearch.transport import _host_text as _host_text

__all__ = [
    "ID_DIGEST_PREFIX",
    "LIVE_SUFFIX",
    "MAX_ID_BYTES",
    "OWNERS_SUFFIX",
    "SCRIPT_NAME",
    "OpenSearchSink",
    "OrjsonSerializer",
    "ViewIndexes",
    "item_id",
    "make_client",
    "script_source",
]
