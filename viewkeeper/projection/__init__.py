"""The view side: the API users write against, loading view modules, running projections."""
