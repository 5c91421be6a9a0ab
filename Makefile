# mtls-fleet: `make demo` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR  ?= demo-fleet
BENCH_DIR ?= bench-data

.PHONY: venv tools lint typecheck unit test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Installs the interop tools (openssl, mosquitto, mosquitto-clients) when missing and possible;
# tests that need a tool that could not be installed are skipped with the reason printed.
tools:
	@bash scripts/ensure-tools.sh

# lint-imports: the layers in pyproject.toml; deptry: every import is a declared dependency
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/deptry .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest --durations=30

test: tools lint typecheck unit

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/fleet demo --dir $(DEMO_DIR)
	$(BIN)/fleet inventory --dir $(DEMO_DIR) --status revoked
	openssl verify -CAfile $(DEMO_DIR)/ca/root.crt -untrusted $(DEMO_DIR)/ca/issuing.crt $(DEMO_DIR)/devices/sensor-00001/cert.pem
	openssl crl -in $(DEMO_DIR)/ca/crl.pem -noout -text | grep -A3 'Revoked Certificates'

bench: $(STAMP)
	$(BIN)/python -m benchmarks --dir $(BENCH_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(BENCH_DIR) .mypy_cache .ruff_cache .pytest_cache
