# Every check is defined once here; .ci/run and developers call the same targets.
PY ?= .venv/bin/python
.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.venv:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip

.PHONY: install
install: .venv ## editable install with every extra (builds the Rust extension)
	.venv/bin/pip install -e ".[dev]"

.PHONY: develop
develop: ## rebuild the Rust extension in release mode after Rust changes
	.venv/bin/maturin develop --release --skip-install

.PHONY: test
test: ## the Python test suite (real gRPC on loopback, real extension)
	$(PY) -m pytest

.PHONY: test-rust
test-rust: ## cargo tests of the pure-Rust core
	cargo test --quiet

.PHONY: lint
lint: ## ruff, rustfmt, clippy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

.PHONY: typecheck
typecheck: ## mypy --strict on metis_async (as Python 3.10) and the stub of the Rust module
	$(PY) -m mypy
	$(PY) -m mypy.stubtest metis_async._core

.PHONY: proto
proto: ## regenerate metis_async/v1 from proto/
	PATH=.venv/bin:$$PATH $(PY) scripts/gen_proto.py

.PHONY: bench
bench: ## aggregation benchmark (writes benches/results/aggregation.json)
	$(PY) benches/aggregation.py --json

.PHONY: demo
demo: ## the digits demo: controller + 10 learner processes
	.venv/bin/metis-async demo

.PHONY: demo-check
demo-check: ## demo run that must reach 0.90 test accuracy (JSON result)
	.venv/bin/metis-async demo --json --no-progress | tail -n 1 | $(PY) -c 'import json, sys; \
	result = json.loads(sys.stdin.read()); print(result); \
	assert result["final_accuracy"] >= 0.90, result'

.PHONY: config-check
config-check: ## the example controller settings (deploy/controller.toml) pass `config check`
	rm -rf .config-check && .venv/bin/metis-async keys ca .config-check >/dev/null
	.venv/bin/metis-async keys server .config-check --host controller.example >/dev/null
	.venv/bin/metis-async keys token-secret .config-check/token-secret >/dev/null
	.venv/bin/metis-async keys admin-token .config-check/admin.token >/dev/null
	METIS_ASYNC_SERVER__TLS_CERT_FILE=.config-check/server.crt \
	METIS_ASYNC_SERVER__TLS_KEY_FILE=.config-check/server.key \
	METIS_ASYNC_SERVER__TOKEN_SECRET_FILE=.config-check/token-secret \
	METIS_ASYNC_ADMIN__TOKEN_FILE=.config-check/admin.token \
	.venv/bin/metis-async config check deploy/controller.toml
	rm -rf .config-check
