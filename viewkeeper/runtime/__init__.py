"""The runtime: where a record is read, applied and checkpointed, and where the guarantees
are kept across processes — the shard worker (``worker``), the supervisor and its leases
(``supervisor``), the apply step (``pipeline``), the rebuild (``rebuild``), dead letters
(``deadletters``), sink namespaces (``namespaces``) and the metrics they record
(``metrics``). It uses the layers below it (the view model in ``projection``, ``stream``,
``sinks``, ``coordination``) and is assembled by ``viewkeeper.app``."""
