# Every target that needs Python depends on the venv stamp, so a fresh clone
# needs nothing but `make run` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The daemon's own dependencies only: what `make run` needs (the development tools are
# most of the install's time).
RUN_STAMP := $(VENV)/.installed-run
# The install compiles the modules in hotpath.COMPILED_MODULES (setup.py): an edit
# rebuilds, so tests run what was edited. Any module is a dependency: the compiled code
# is type-checked against what it imports and holds copies of the `Final` constants it
# reads from them, so an edit to an interpreted module can change it too.
HOT_PATH := setup.py daemon/sipcdr/sip/_scan.c $(shell find daemon/sipcdr -name '*.py')
# The quiet install hides a compile that fell back to pure Python: with a compiler here,
# the development set-up stops on it at once rather than after the suite has run.
CHECK_BUILD := -c 'import shutil, sys; from sipcdr import hotpath; kind, why = hotpath.hot_path(); \
	want = not hotpath.pure_python_forced() and bool(shutil.which("cc") or shutil.which("gcc")); \
	sys.exit(f"sipcdr: the hot path did not compile ({why}); pip install -v -e . shows why" \
	if want and kind != "compiled" else 0)'
SYSTEM_TOOLS := tshark:tshark sipp:sip-tester kamailio:kamailio promtool:prometheus

.PHONY: run test lint typecheck unit bench sysdeps clean

$(STAMP): pyproject.toml $(HOT_PATH)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python $(CHECK_BUILD)
	touch $(STAMP) $(RUN_STAMP)

# A venv set up for development serves `make run` as it is.
$(RUN_STAMP): pyproject.toml $(HOT_PATH)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

# System programs the integration tests drive; installed only when missing.
sysdeps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# CONFIG=sipcdr.toml to run with a configuration file (see sipcdr.example.toml).
run: $(RUN_STAMP)
	$(BIN)/sipcdr run $(if $(CONFIG),-c $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The fast loop: no servers, no peers, no daemons; under a minute.
unit: $(STAMP) sysdeps
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

test: $(STAMP) sysdeps lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/parser.py
	$(BIN)/python benchmarks/dialogs.py
	$(BIN)/python benchmarks/rating.py
	$(BIN)/python benchmarks/receive.py
	$(BIN)/python benchmarks/capture_path.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/import_captures.py --interpreted
	$(BIN)/python benchmarks/import_postgres.py
	$(BIN)/python benchmarks/connections.py
	$(BIN)/python benchmarks/spool.py
	$(BIN)/python benchmarks/signaling.py
	$(BIN)/python benchmarks/restricted_calls.py
	$(BIN)/python benchmarks/journal.py
	$(BIN)/python benchmarks/kafka.py
	$(BIN)/python benchmarks/postgres.py
	$(BIN)/python benchmarks/delivery.py
	$(BIN)/python benchmarks/fraud.py
	$(BIN)/python benchmarks/replay.py
	$(BIN)/python benchmarks/stages.py
	$(BIN)/python benchmarks/enrich_numbers.py
	$(BIN)/python benchmarks/cdr_init.py
	$(BIN)/python benchmarks/signaling_digest.py
	$(BIN)/python benchmarks/delivery_overhead.py
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/shard_handoff.py
	$(BIN)/python benchmarks/e2e.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
	find daemon -name '*.so' -delete
