# Locus — the contract: every target does one thing; `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
LOCUS := ./target/release/locus

.DEFAULT_GOAL := help
.PHONY: help build fmt lint test soak bench run image up down chaos chaos-short

COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_FILE := docker/compose.yaml
export COMPOSE_PROJECT_NAME ?= locus

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

build: ## Build the release binary (target/release/locus)
	$(CARGO) build --release

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## Clippy on every target, warnings are errors
	$(CARGO) clippy --all-targets -- -D warnings

test: ## Format check, lint, then every test (unit, property, end-to-end)
	$(CARGO) fmt --all -- --check
	$(MAKE) --no-print-directory lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

soak: ## The seeded random cluster scenario over many seeds (SEEDS=20 STEPS=12); stops at the first failing seed
	@for s in $$(seq 1 $${SEEDS:-20}); do \
		echo "== seed $$s"; \
		LOCUS_SIM_SEED=$$s LOCUS_SIM_STEPS=$${STEPS:-12} $(CARGO) test -q --test sim a_seeded_random -- --nocapture 2>&1 \
			| grep -E '^\[sim\] (seed|[0-9]+ operations)|panicked|test result' || true; \
		[ $${PIPESTATUS[0]} -eq 0 ] || { echo "seed $$s failed: replay with LOCUS_SIM_SEED=$$s LOCUS_SIM_STEPS=$${STEPS:-12}"; exit 1; }; \
	done

bench: build ## Run the benchmarks (Locus and redis-server side by side) and write BENCHMARKS.md
	@command -v redis-server >/dev/null || echo "redis-server not installed: apt-get install redis-server for the comparison"
	$(LOCUS) bench --out BENCHMARKS.md
	$(CARGO) bench --bench core | tee target/core-bench.txt
	@{ echo; echo '## Core micro-benchmark (`cargo bench --bench core`, no gRPC)'; echo; \
	   echo '```text'; grep -v '^$$' target/core-bench.txt; echo '```'; } >> BENCHMARKS.md

run: build ## Start a 3-node local cluster and the city simulator feeding it (Ctrl-C stops all)
	./cluster/run-local.sh

image: build ## Build the locus:latest image FROM scratch around the release binary (docker/)
	./docker/build-image.sh

up: image ## Start the 3-node compose cluster with auth on and the simulator feeding it
	./docker/secrets.sh
	$(COMPOSE) -f $(COMPOSE_FILE) up -d
	./docker/wait-healthy.sh
	$(LOCUS) --token-file docker/secrets/admin.token admin --addr http://127.0.0.1:7400 members
	@echo
	@echo "Live map:  http://127.0.0.1:7480/map#token=$$(cat docker/secrets/reader.token)"
	@echo "Simulator: $(COMPOSE) -f $(COMPOSE_FILE) logs -f sim"
	@echo "Operator:  $(LOCUS) --token-file docker/secrets/admin.token admin --addr http://127.0.0.1:7400 partitions --summary"
	@echo "Scale:     $(COMPOSE) -f $(COMPOSE_FILE) --profile scale up -d --scale locus-extra=2"
	@echo "Stop:      make down"

down: ## Stop the compose cluster (its data stays on named volumes; add -v to the compose command to wipe it)
	$(COMPOSE) -f $(COMPOSE_FILE) --profile scale down

chaos: build ## Break a real cluster on purpose under load (kill, pause, partitions, rolling restart, scale, bad link) and check the history (root)
	$(LOCUS) chaos --dir target/chaos

chaos-short: ## The short chaos suite CI runs (kill, pause, partition, rolling restart), on the debug binary make test built (root)
	$(CARGO) test --no-run -q
	./target/debug/locus chaos --short --dir target/chaos
