"""Where change records enter: only modules here speak DynamoDB Streams."""
