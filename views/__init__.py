"""Example view modules, used by `viewkeeper demo` and by the tests."""
