# ngx_event_piper: build, run and test. Every target that needs Debian packages first runs
# scripts/deps.sh, which installs only what is missing (apt-get, as root): building and running
# need the smallest set; packaging and the tests add theirs.

PORT ?= 4000
export PORT

SHELL := /bin/bash

.PHONY: all deps deps-package deps-test deps-bench build build-asan unit unit-build run psql stop \
        test test-asan test-deb deb format clean bench bench-quick bench-writers bench-stall \
        bench-patching bench-standby bench-year bench-retention soak clients docker-build docker-run \
        test-docker nginx-versions \
        test-nginx-versions

all: build

deps:
	@scripts/deps.sh

deps-package:
	@scripts/deps.sh package

deps-test:
	@scripts/deps.sh test

deps-bench:
	@scripts/deps.sh bench

## The nginx module: build/ngx_event_piper_module.so (see scripts/build.sh).
build: deps
	@scripts/build.sh

build-asan: deps
	@SANITIZE=1 scripts/build.sh

## Unit tests: build/unit_tests, a GoogleTest binary of src/*.cpp and tests/unit/*.cpp.
# src/core/ is nginx-free; src/ngx/ holds the nginx adapters, which only the module links.
UNIT_CXX      ?= g++
UNIT_CXXFLAGS := -std=gnu++17 -O1 -g -Wall -Wextra -Isrc/core
UNIT_LDLIBS   := -lgtest -lgtest_main -lcjson -pthread
UNIT_SRCS     := $(wildcard src/core/*.cpp) $(wildcard tests/unit/*.cpp)
UNIT_OBJS     := $(patsubst %.cpp,build/unit/%.o,$(UNIT_SRCS))
UNIT_LIST     := build/unit/sources.list

build/unit/%.o: %.cpp | deps-test
	@mkdir -p $(@D)
	$(UNIT_CXX) $(UNIT_CXXFLAGS) -MMD -MP -c $< -o $@

# Rewritten only when the set of sources changes, so removing a file relinks the binary.
$(UNIT_LIST): FORCE
	@mkdir -p $(@D)
	@echo '$(UNIT_SRCS)' | cmp -s - $@ || echo '$(UNIT_SRCS)' > $@

build/unit_tests: $(UNIT_OBJS) $(UNIT_LIST)
	@test -n '$(wildcard tests/unit/*.cpp)' || { echo "no unit tests in tests/unit/" >&2; exit 1; }
	$(UNIT_CXX) $(UNIT_CXXFLAGS) $(UNIT_OBJS) -o $@ $(UNIT_LDLIBS)

-include $(UNIT_OBJS:.o=.d)

## build/grammar_check: the parser and the positioner's notifications on stdin/stdout, for
# tests/integration/test_grammar.py (docs/notification-grammar.md).
GRAMMAR_CHECK_OBJS := $(patsubst %.cpp,build/unit/%.o,$(wildcard src/core/*.cpp) \
                      tests/grammar/grammar_check.cpp)

build/grammar_check: $(GRAMMAR_CHECK_OBJS)
	$(UNIT_CXX) $(UNIT_CXXFLAGS) $(GRAMMAR_CHECK_OBJS) -o $@ -lcjson -pthread

-include build/unit/tests/grammar/grammar_check.d

unit-build: build/unit_tests

unit: build/unit_tests
	build/unit_tests

## Local servers: PostgreSQL + nginx in the foreground (see scripts/run.sh). Ctrl-C stops both.
# SOURCE=wal: event_piper_source wal (wal_level = logical, the database switched; SOURCE=trigger,
# the default, switches it back).
SOURCE ?= trigger

run: build
	@SOURCE='$(SOURCE)' scripts/run.sh start

psql: deps
	@scripts/run.sh psql

stop:
	@scripts/run.sh stop

## Tests: the unit tests (build/unit_tests), then the integration tests with pytest
# (tests/integration, real PostgreSQL + real nginx). Both always run; the last line is pytest's
# summary, and either failing fails the target (pytest's "no tests collected", status 5, too).
# Select with PYTEST_ARGS (e.g. make test PYTEST_ARGS='-k replay') and GTEST_FILTER; UNIT=0
# skips the unit tests. Debian's interpreter, which sees python3-pytest and python3-psycopg2.
PYTHON      ?= /usr/bin/python3
PYTEST_ARGS ?=
UNIT        ?= 1

UNIT_BIN = $(if $(wildcard tests/unit/*.cpp),build/unit_tests)

# Real-client tests use the npm `eventsource` package, pinned in tests/clients/package-lock.json.
CLIENTS_STAMP := tests/clients/node_modules/.package-lock.json

$(CLIENTS_STAMP): tests/clients/package.json tests/clients/package-lock.json
	npm ci --prefix tests/clients --no-audit --no-fund --loglevel=error

clients: deps-test $(CLIENTS_STAMP)

# Test clusters are thrown away: fsync and synchronous_commit off (scripts/pgctl.sh). `make run`
# keeps PostgreSQL's durable defaults.
test test-asan: export EVENT_PIPER_PG_FAST := 1

define RUN_TESTS
	unit=0; \
	if [ '$(UNIT)' != 0 ]; then \
	    if [ -n '$(UNIT_BIN)' ]; then $(UNIT_BIN) || unit=$$?; \
	    else echo "no unit tests in tests/unit/" >&2; unit=1; fi; \
	fi; \
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest tests/integration $(PYTEST_ARGS); it=$$?; \
	if [ $$unit != 0 ]; then echo "unit tests FAILED (build/unit_tests exited with $$unit)"; fi; \
	if [ $$it = 5 ]; then echo "no integration test collected: counted as a failure"; fi; \
	[ $$unit = 0 ] && [ $$it = 0 ]
endef

# make test runs make test-deb first (the Debian package, below), so that pytest's summary stays
# the last line; a failure of either fails the target.
test: build $(UNIT_BIN) build/grammar_check clients
	@deb=0; $(MAKE) --no-print-directory test-deb || deb=1; \
	$(RUN_TESTS); status=$$?; \
	if [ $$deb != 0 ]; then echo "make test-deb FAILED (see above)"; fi; \
	[ $$status = 0 ] && [ $$deb = 0 ]

# Same tests against the module built with ASan + UBSan. The Debian nginx binary is not
# instrumented, so the sanitizer runtimes must be preloaded into nginx (EVENT_PIPER_NGINX_PRELOAD);
# leak detection is off because nginx frees its pools by exiting.
ASAN_PRELOAD = $(shell $(UNIT_CXX) -print-file-name=libasan.so) $(shell $(UNIT_CXX) -print-file-name=libubsan.so)

test-asan: export EVENT_PIPER_MODULE = $(CURDIR)/build/asan/ngx_event_piper_module.so
test-asan: export EVENT_PIPER_NGINX_PRELOAD = $(ASAN_PRELOAD)
test-asan: export ASAN_OPTIONS = detect_leaks=0:abort_on_error=1
test-asan: export UBSAN_OPTIONS = print_stacktrace=1:halt_on_error=1:abort_on_error=1
test-asan: build-asan $(UNIT_BIN) build/grammar_check clients
	@$(RUN_TESTS)

## nginx version matrix: nginx and the module built from each source in NGINX_SRC_DIR
# (nginx-<version>.tar.gz, `git archive`s of nginx's release tags, see
# ../shared/nginx-src/README.md) by scripts/nginx-version.sh, with nginx's -Werror, then the
# integration tests marked `smoke` against each. The builds run side by side
# (NGINX_VERSIONS_JOBS jobs in all) and stay in build/nginx-versions/<version>/, so that the next
# run rebuilds only what changed; the tests run one version after the other.
NGINX_SRC_DIR       ?= $(CURDIR)/../shared/nginx-src
NGINX_VERSIONS      ?= 1.24.0 1.26.3 1.30.4 1.31.4
NGINX_VERSIONS_JOBS ?= 2

nginx-versions: deps-test
	@test -d '$(NGINX_SRC_DIR)' || { echo "nginx-versions: $(NGINX_SRC_DIR) not found: the nginx \
	sources of the version matrix (set NGINX_SRC_DIR to the folder of nginx-<version>.tar.gz)" >&2; exit 1; }
	@$(MAKE) --no-print-directory -j$(NGINX_VERSIONS_JOBS) $(addprefix nginx-version-,$(NGINX_VERSIONS))

nginx-version-%: FORCE
	+@scripts/nginx-version.sh '$(NGINX_SRC_DIR)' '$*'

test-nginx-versions: nginx-versions
	@failed=; for v in $(NGINX_VERSIONS); do \
	    echo "test-nginx-versions: nginx $$v"; \
	    NGINX_BIN='$(CURDIR)/build/nginx-versions/'$$v/nginx \
	    EVENT_PIPER_MODULE='$(CURDIR)/build/nginx-versions/'$$v/ngx_event_piper_module.so \
	    EVENT_PIPER_PG_FAST=1 PYTHONDONTWRITEBYTECODE=1 \
	        $(PYTHON) -m pytest tests/integration -m smoke $(PYTEST_ARGS) || failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-nginx-versions FAILED with nginx$$failed"; exit 1; fi; \
	echo "test-nginx-versions: the smoke tests passed with nginx $(NGINX_VERSIONS)"

## Formatting with the checked-in .clang-format.
FORMAT_FILES = $(wildcard *.cpp src/core/*.cpp src/core/*.hpp src/ngx/*.cpp src/ngx/*.hpp tests/unit/*.cpp tests/unit/*.hpp)

format: deps-test
	@test -n '$(FORMAT_FILES)' || { echo "nothing to format"; exit 0; }
	clang-format -i $(FORMAT_FILES)

## Debian package: build/deb/libnginx-mod-http-event-piper_<version>_<arch>.deb, built by
# dpkg-buildpackage from debian/ (debhelper's nginx sequence, as Debian builds its nginx modules)
# in a copy of the tree, so that nothing is written outside build/. Root is not needed.
DEB_DIR := build/deb

deb: deps-package
	@rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src/tree
	@tar -c --exclude=./build --exclude=./.git --exclude=./.run --exclude=node_modules . \
	    | tar -x -C $(DEB_DIR)/src/tree
	cd $(DEB_DIR)/src/tree && dpkg-buildpackage -b -us -uc -J2 >../build.log 2>&1 \
	    || { tail -n 40 ../build.log >&2; echo "deb: dpkg-buildpackage failed (log: $(DEB_DIR)/src/build.log)" >&2; exit 1; }
	@mv $(DEB_DIR)/src/*.deb $(DEB_DIR)/
	lintian --fail-on error $(DEB_DIR)/*.deb
	@ls -1 $(DEB_DIR)/*.deb

# Installs that package into this machine's nginx like a user would, streams an event through
# the system nginx, purges it and restores /etc/nginx (tests/package/test_deb.py). Needs root.
test-deb: deb deps-test
	$(PYTHON) tests/package/test_deb.py $(DEB_DIR)/libnginx-mod-http-event-piper_*.deb

## Benchmarks (bench/run.sh, see design.md section 6).
BENCH_CHECK = @test -x bench/run.sh || { echo "bench/run.sh is missing: no benchmark suite yet" >&2; exit 1; }

bench: deps-bench
	$(BENCH_CHECK)
	@scripts/build.sh
	bench/run.sh

bench-quick: deps-bench
	$(BENCH_CHECK)
	@scripts/build.sh
	bench/run.sh --quick

# Only section (j), latency while the listener checks a table of 10,000,000 events (issue 20);
# its results go to build/bench-stall/, bench/results.md is left as it is.
bench-stall: deps-bench
	$(BENCH_CHECK)
	@scripts/build.sh
	BENCH_TESTS=j BENCH_WRITERS=0 BENCH_PATCHING=0 BENCH_STANDBY=0 BENCH_OUT=build/bench-stall BENCH_COMMAND="make bench-stall" bench/run.sh

# Only section (y), a year of events: resume, live and writer figures on a small table
# and on BENCH_YEAR_ROWS events (default 20,000,000); results in build/bench-year/year.md.
bench-year: deps-bench
	$(BENCH_CHECK)
	@scripts/build.sh
	BENCH_TESTS=y BENCH_WRITERS=0 BENCH_PATCHING=0 BENCH_STANDBY=0 BENCH_OUT=build/bench-year BENCH_COMMAND="make bench-year" bench/run.sh

# Retention's cost (README "Retention"): removing RETENTION_EVENTS events (default 1,000,000)
# while writers insert; results in build/bench-retention/retention.md. PostgreSQL only.
bench-retention: deps
	bench/retention.sh

# Only the writer section (what an event costs the database; nginx only for its wal column).
bench-writers: deps
	@scripts/build.sh
	BENCH_COMMAND="make bench-writers" bench/writers.sh

# Only the patching section (folded replay of 100,000 events with 10 patches each against their
# full history: bytes and rows/s; bench/patching.py, results in bench/patching.json).
bench-patching: deps-bench
	@scripts/build.sh
	bench/patching.py

# Only the standby section (100 clients resuming 100,000 events each with a hot standby named by
# event_piper_replay_postgres: the primary's share of the replayed rows; bench/standby.py, results
# in bench/standby.json).
bench-standby: deps-bench
	@scripts/build.sh
	bench/standby.py

## The soak (tests/integration/soak_chaos.py, not part of `make test`): the chaos test's mix for
# SOAK_MINUTES; fails on loss, duplication or growth of worker RSS, fds or PostgreSQL connections.
# Writes bench/soak.csv, bench/soak.png and the Soak section of bench/results.md.
SOAK_MINUTES ?= 20

soak: build clients deps-bench
	SOAK_MINUTES=$(SOAK_MINUTES) EVENT_PIPER_CHAOS_SOURCES=trigger PYTHONDONTWRITEBYTECODE=1 \
	    $(PYTHON) -m pytest \
	    tests/integration/soak_chaos.py $(PYTEST_ARGS)

## Container deployment (docker/, README "Docker"), with docker if a Docker daemon answers, else
# podman (scripts/deps.sh docker installs it; docker/containers.conf sets it up for this machine).
# docker-build: the image ngx_event_piper from docker/Dockerfile (and the base debian:12 if
# missing: pulled, or made with debootstrap where no registry is reachable).
docker-build:
	@docker/build.sh

# docker-run: the image, then nginx + PostgreSQL 15 from docker/compose.yaml in the foreground.
docker-run: docker-build
	@source docker/engine.sh && "$${COMPOSE[@]}" -f docker/compose.yaml up

# test-docker: builds, runs the stack, walkthrough + replay + database restart, tears it down
# (tests/docker/run.sh). Images stay cached for the next run.
test-docker:
	@tests/docker/run.sh

clean:
	rm -rf build

FORCE:
