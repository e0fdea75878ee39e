"""The chaos suite's parts (tests/test_chaos.py drives them).

- :mod:`tests.chaos.proxy`: a TCP proxy on 127.0.0.1 that the test can cut (refuse, reset or
  stall connections), restore, and arm to hold one request that matches a byte pattern.
- :mod:`tests.chaos.daemons`: viewkeeper daemons as subprocesses (kill -9, SIGTERM, SIGSTOP).
- :mod:`tests.chaos.workload`: a seeded writer of creates, updates that move fan-out
  entries, deletes and re-creates, through boto3 on moto.
- :mod:`tests.chaos.checker`: the projection of a full table scan compared with what the sinks
  hold: missing, stale and orphaned entries per sink (I1).
- :mod:`tests.chaos.lambda_applier`: the Lambda handler fed as Lambda's poller feeds it, in a
  thread, beside the daemons.
- :mod:`tests.chaos.harness`: all of the above wired together, the faults as methods, the
  final drain and check, and a diagnosis (stored version, owner record, stream history) of
  every OpenSearch difference.
"""
