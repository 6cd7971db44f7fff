# The customers service. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed
# The original example's own stack, the benchmark's second baseline (Python 3.11: its redis
# 3.5.3 imports distutils)
ORIGINAL_VENV := benchmarks/.venv-original
ORIGINAL_INSTALLED := $(ORIGINAL_VENV)/.installed

.PHONY: help run test bench fuzz cluster reliability lint clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(INSTALLED): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV_INSTALLED): $(INSTALLED) requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(ORIGINAL_INSTALLED): benchmarks/requirements-original.txt
	test -x $(ORIGINAL_VENV)/bin/python || $(PYTHON) -m venv $(ORIGINAL_VENV)
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r benchmarks/requirements-original.txt
	touch $@

run: $(INSTALLED) ## Start the service (an embedded, durable Valkey when DBHOST is unset)
	$(BIN)/python src/server.py

test: $(DEV_INSTALLED) ## Run every test, the real-cluster ones included
	$(BIN)/python -m pytest

cluster: $(DEV_INSTALLED) ## Run a MemoryDB-shaped local cluster (TLS, ACL users, replicas) until Ctrl-C
	bash .ci/install-redis >/dev/null
	PYTHONPATH=src $(BIN)/python tests/local_cluster.py

reliability: $(DEV_INSTALLED) ## Run the fault tests and print a table per fault
	bash .ci/install-redis >/dev/null
	rm -f $(VENV)/reliability.md
	RELIABILITY_REPORT=$(VENV)/reliability.md $(BIN)/python -m pytest -q \
		tests/test_faults.py tests/test_embedded_faults.py tests/test_idempotency_faults.py; \
		status=$$?; echo; cat $(VENV)/reliability.md; exit $$status

bench: $(DEV_INSTALLED) $(ORIGINAL_INSTALLED) ## Benchmark against the original (rebuilt, and on its own client) with appendfsync everysec and always; where a POST's time goes; an Idempotency-Key's, metrics' and a request's CPU cost; workers on CPUs of their own (about 18 minutes; installs wrk)
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(BIN)/python benchmarks/bench.py --appendfsync everysec
	$(BIN)/python benchmarks/bench.py --appendfsync always --requests-only
	$(BIN)/python benchmarks/post_time.py --appendfsync always
	$(BIN)/python benchmarks/idempotency_cost.py
	$(BIN)/python benchmarks/metrics_overhead.py
	$(BIN)/python benchmarks/cpu_per_request.py
	$(BIN)/python benchmarks/worker_cpus.py

fuzz: $(DEV_INSTALLED) ## Fuzz a running service against the document it serves: make fuzz [URL=...] [TOKEN=...] [EXAMPLES=500]
	$(BIN)/python -c 'import sys, urllib.request as u; sys.stdout.buffer.write(u.urlopen(u.Request(sys.argv[1] + "/openapi.json", headers={"Authorization": "Bearer " + sys.argv[2]} if sys.argv[2] else {}), timeout=10).read())' \
		$(or $(URL),http://127.0.0.1:8080) "$(TOKEN)" > $(VENV)/served-openapi.json
	$(BIN)/schemathesis --config-file tests/schemathesis.toml run $(VENV)/served-openapi.json \
		--url $(or $(URL),http://127.0.0.1:8080) --max-examples $(or $(EXAMPLES),500) \
		$(if $(TOKEN),--header "Authorization: Bearer $(TOKEN)")

lint: $(DEV_INSTALLED) ## Check the code with ruff
	$(BIN)/ruff check src tests benchmarks

clean: ## Remove the virtual environments (data/ is kept)
	rm -rf $(VENV) $(ORIGINAL_VENV)
