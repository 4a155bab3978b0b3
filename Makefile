# The two commands a new user runs (see README):
#   make demo   installs into .venv and runs the whole job end to end on embedded defaults
#   make test   installs into .venv (with test extras) and runs the test suite
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= segsearch-demo

.PHONY: install install-test demo test bench clean

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test
	bash scripts/install_test_tools.sh

demo: install
	$(VENV)/bin/segsearch demo --workdir $(DEMO_DIR)

test: install-test
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/train_quality.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
