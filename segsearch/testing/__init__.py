"""Test support shared by `tests/` and `bench/` (as `numpy.testing` is): a `segsearch serve`
child process, hypothesis strategies over every request field, kill -9 rounds, a soak.

Needs the test extra (`pip install -e .[test]`: psutil, hypothesis); the service never imports it."""
