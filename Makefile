# Turnstile: the two commands of the quick start are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help run test chaos fuzz bench observe services cluster ha stop status admin docker-env fmt lint

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

run: ## start PostgreSQL + RabbitMQ, migrate, run api + worker on http://127.0.0.1:8080 (Ctrl-C stops)
	@bash scripts/run.sh

test: ## the whole suite: fmt, clippy, unit and end-to-end tests against real services
	@bash scripts/test.sh

chaos: ## the fault suite alone, under load: kill -9 / SIGTERM of api and worker, RabbitMQ and PostgreSQL restarts, RabbitMQ cluster nodes killed, Patroni leader and standby killed, frozen, switched over (CHAOS_ARGS=--async-replication: the leader kill on asynchronous standbys)
	@bash scripts/chaos.sh $(CHAOS_ARGS)

fuzz: ## schemathesis (installed from PyPI into .local/) against the served OpenAPI document, as an admin
	@bash scripts/fuzz.sh

bench: ## measure: make bench [SCENARIOS="baseline hot spread ..."] [RUNS=3] [LOADGEN_ARGS=...] (see BENCHMARKS.md)
	@bash scripts/bench.sh

observe: ## Prometheus (from the distribution's package) scraping make run's api and worker, http://127.0.0.1:19090
	@bash scripts/observe.sh

services: ## start only PostgreSQL + RabbitMQ (installed from Debian packages if missing)
	@bash scripts/services.sh start

cluster: ## like services, with RabbitMQ as a cluster of three nodes (AMQP on 56720-56722; the env file lists all three)
	@TURNSTILE_RABBIT_NODES=3 bash scripts/services.sh start

ha: ## like services, with PostgreSQL as three Patroni members (synchronous replication, etcd) behind HAProxy on the usual port
	@TURNSTILE_PG_HA=1 bash scripts/services.sh start

stop: ## stop the services that `make services`/`make ha`/`make cluster`/`make run`/`make test` started
	@bash scripts/services.sh stop

status: ## are the local services, and make run's api and worker, running?
	@bash scripts/services.sh status

admin: ## create an admin: make admin EMAIL=you@example.com (asks for the password)
	@test -n "$(EMAIL)" || { echo "usage: make admin EMAIL=you@example.com" >&2; exit 2; }
	@source "$$(bash scripts/services.sh env)" && cargo run --quiet --release --bin api -- create-admin --email "$(EMAIL)"

docker-env: ## write .env with generated secrets for docker compose (once; kept on later runs)
	@bash scripts/docker-env.sh

fmt: ## format the code
	cargo fmt

lint: ## formatting, clippy, cargo doc and shellcheck, with warnings as errors, as the test suite checks them
	@bash scripts/lint.sh
