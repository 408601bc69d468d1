# tokenfan: one entry point for running, testing and benchmarking.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_DIR := target/release
# make run builds the edge alone with the `quick` profile (optimised, no debuginfo, quick to
# build on a fresh clone); benchmarks and the cluster use `release`.
RUN_DIR := target/quick

.PHONY: run run-generator test test-browser test-clients validate-deploy compose-smoke check-metrics lint fmt build release deps cluster-up cluster-down bench bench-generator bench-edge bench-cluster soak soak-faults fuzz clean

## run: build and start the edge on its embedded default (no NATS, Redis or separate generator)
run:
	$(CARGO) build --profile quick --locked -p tokenfan-edge --bin tokenfan-edge
	@echo "tokenfan: open http://127.0.0.1:8080/ (Ctrl-C stops it)"
	$(RUN_DIR)/tokenfan-edge --listen 127.0.0.1:8080

## run-generator: the mock LLM alone (gRPC on 127.0.0.1:50051, metrics on 127.0.0.1:9464)
run-generator:
	$(CARGO) build --profile quick --locked -p tokenfan-generator --bin tokenfan-generator
	$(RUN_DIR)/tokenfan-generator

## test: format check, clippy -D warnings, every test (installs what is missing first)
test: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked
	$(MAKE) test-browser test-clients
	$(MAKE) validate-deploy
	$(MAKE) check-metrics

## test-browser: the demo page in headless Chromium (playwright-core)
test-browser: build
	tests/browser/run.sh

## test-clients: third-party clients (OpenAI Python SDK, httpx-sse, Node eventsource)
test-clients: build
	tests/clients/run.sh

## validate-deploy: Dockerfile, compose, k8s overlays, Prometheus config and dashboards, checked statically
validate-deploy: build
	scripts/validate-deploy.sh

## compose-smoke: build the image from deploy/Dockerfile and run deploy/compose.yaml with podman:
## streams, failover and drain through nginx, Prometheus scrapes, image checks (CI runs it after test)
compose-smoke:
	scripts/compose-smoke.sh

## check-metrics: promtool check metrics on the edge's and the generator's /metrics after a stream
check-metrics: build
	scripts/check-metrics.sh target/debug

## fuzz: each cargo-fuzz target (fuzz/) for FUZZ_SECS seconds from its committed corpus; fails on any crash
FUZZ_SECS ?= 180
fuzz:
	@scripts/install-deps.sh c++:g++
	FUZZ_SECS=$(FUZZ_SECS) scripts/fuzz.sh

## lint: format check and clippy only
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace --locked

release:
	$(CARGO) build --release --locked --bins

## deps: install the Debian packages the tests use when they are missing (redis-cli builds the test Redis Cluster)
deps:
	@scripts/install-deps.sh nats-server:nats-server redis-server:redis-server redis-cli:redis-tools

## cluster-up: nats, redis, 2 generators, 3 edges (8081-8083) and nginx on 8080, on loopback
cluster-up:
	scripts/cluster.sh up

## cluster-down: stop the local cluster
cluster-down:
	scripts/cluster.sh down

## bench: tokenfan side by side with its peers (Node/Express, Pushpin, the direct gRPC floor), one
## load generator; QUICK=1 make bench runs one small step per system (see docs/benchmarks.md)
bench:
	scripts/bench.sh

## bench-generator: 10,000 concurrent generations at 50 tokens/s, generator pinned to core 0
bench-generator: release
	scripts/bench-generator.sh

## bench-cluster: 1 replica vs 3 behind nginx, and 1 stream x 1,000 viewers over 3 replicas
bench-cluster:
	scripts/bench-cluster.sh

## soak: the local cluster under load for SOAK_SECS (300) while edges, generators, NATS and Redis are killed (kill -9) in turn,
## then the fault soak for as long: pauses (SIGSTOP) past the lease, generator stalls, Redis AOF restarts and rollbacks, stops during failover
SOAK_SECS ?= 300
soak:
	SOAK_SECS=$(SOAK_SECS) scripts/soak.sh
	$(MAKE) soak-faults

## soak-faults: the fault soak alone (tests/faults.rs) for SOAK_SECS, every transcript and stored epoch checked
soak-faults:
	FAULT_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --release --locked -p tokenfan-edge --test faults fault_soak -- --nocapture

## bench-edge: added delay at 1,000 streams and RSS per idle SSE/WebSocket connection
bench-edge:
	scripts/bench-edge.sh

clean:
	$(CARGO) clean
