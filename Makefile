# damage: two commands on a fresh machine.
#   make demo   install into .venv (first time) and run the whole nightly pipeline on synthetic data
#   make test   install into .venv (first time) and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# All state (MLflow DB + artifacts, Prefect home, runs, caches, temp files) lives here.
export DAMAGE_STATE_DIR ?= $(CURDIR)/.state
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0
PYTEST_ARGS ?=
# `make test` runs the suite in two pytest-xdist workers (tests/conftest.py: one thread each, a state dir each, and
# the tests that share an expensive fixture on one worker); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

.PHONY: install demo test test-slow lint ui-mlflow ui-prefect clean-state prefect-yaml constraints

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@# [server]: psycopg2 and MLflow basic auth, which the integration tests start servers with
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev,server,ray]'
	@# opencv-python-headless beside opencv-python breaks cv2 silently: refuse it.
	@! $(BIN)/python -m pip show -q opencv-python-headless 2>/dev/null || \
	  { echo "opencv-python-headless is installed next to opencv-python; uninstall it"; exit 1; }
	touch $(STAMP)

demo: install
	$(BIN)/damage run --demo

test: install
	mkdir -p $(DAMAGE_STATE_DIR)
	DAMAGE_TEST_STATE=$(DAMAGE_STATE_DIR)/test-$$$$ $(BIN)/python -m pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

ui-mlflow: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(DAMAGE_STATE_DIR)/mlflow.db --host 127.0.0.1 --port 5000

ui-prefect: install
	PREFECT_HOME=$(DAMAGE_STATE_DIR)/prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# infra/prefect.yaml is generated from flows/deploy.py (a test fails when they differ)
prefect-yaml: install
	$(BIN)/python -m damage.flows.deploy infra/prefect.yaml

# constraints.txt: the installed version of every direct dependency in pyproject.toml (run it in a
# tested environment after changing pyproject.toml; a test checks the pins against the ranges)
constraints: install
	@$(BIN)/python -c 'import re, tomllib; from importlib.metadata import version; \
	p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	reqs = p["dependencies"] + [r for v in p["optional-dependencies"].values() for r in v]; \
	names = sorted({re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs}, key=str.lower); \
	print("\n".join(f"{n}=={version(n)}" for n in names))' > constraints.txt.new
	{ grep '^#' constraints.txt; cat constraints.txt.new; } > constraints.txt.tmp && rm constraints.txt.new && mv constraints.txt.tmp constraints.txt

clean-state:
	rm -rf $(DAMAGE_STATE_DIR)
