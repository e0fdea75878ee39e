"""Where entries are written: only modules here speak Redis or OpenSearch."""
