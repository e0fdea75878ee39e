"""Where the checkpoint moves: leases, checkpoints, generations, workers and dead letters,
kept in one coordination table (DynamoDB in production, memory in unit tests)."""
