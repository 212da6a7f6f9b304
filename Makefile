# submitd — `make run` sets up and serves, `make test` sets up and runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST := $(BIN)/python -m pytest

.PHONY: install run lint typecheck test test-deps test-unit test-integration test-security test-external test-examples bench profile tls-scan fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

var/submitd.toml: | $(STAMP)
	$(BIN)/submitd quickstart var

run: $(STAMP) var/submitd.toml
	$(BIN)/submitd serve -c var/submitd.toml

lint: $(STAMP)
	$(BIN)/ruff check submitd plugins tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The programs the tests drive (systemd-analyze, fail2ban, swaks, Postfix, ...): names what is
# missing and the apt-get command that installs it, before any test runs.
test-deps:
	@scripts/check-test-deps

test-unit: $(STAMP)
	@scripts/check-test-deps unit
	$(PYTEST) -q tests/unit

test-integration: $(STAMP)
	@scripts/check-test-deps integration
	$(PYTEST) -q tests/integration

# One test per rule of docs/security.md, each an attack over real sockets (under a minute).
# It drives no program besides Python, so there is nothing for check-test-deps to look for.
test-security: $(STAMP)
	$(PYTEST) -q tests/security

test-external: $(STAMP)
	@scripts/check-test-deps external
	$(PYTEST) -q tests/external

# The example third-party plugin package (docs/plugins.md), installed into the venv as a plugin
# author would install theirs (no new dependencies), and its own tests written with the kit.
EXAMPLES := examples/submitd-example-limit
test-examples: $(STAMP)
	for dir in $(EXAMPLES); do \
		$(BIN)/python -m pip install -q --no-deps -e $$dir && \
		(cd $$dir && $(CURDIR)/$(BIN)/python -m pytest -q tests) || exit 1; \
	done

test: test-deps lint typecheck test-unit test-integration test-security test-external test-examples

# Installs its peers (Postfix, smtp-sink, saslpasswd2 by apt as root; aiosmtpd, py-spy by pip).
bench: $(STAMP)
	@bench/setup-peers $(VENV)
	@$(BIN)/python bench/run.py $(BENCH_ARGS)

# py-spy profiles of submitd under session and reconnect into $(PROFILE_DIR).
PROFILE_DIR ?= /tmp/submitd-profile
profile: $(STAMP)
	@bench/setup-peers $(VENV)
	@$(BIN)/python bench/run.py --workload session --workload reconnect \
		--profile $(PROFILE_DIR) $(BENCH_ARGS)

# The property tests (protocol core, addresses, SASL, users file) with 20,000 examples each
# (several minutes).
fuzz: $(STAMP)
	SUBMITD_HYPOTHESIS_PROFILE=fuzz $(PYTEST) -q tests/unit/test_protocol_fuzz.py \
		tests/unit/test_fuzz_targets.py

# Needs Debian's testssl.sh (apt-get install testssl.sh); about 90 s.
tls-scan: $(STAMP)
	@$(BIN)/python bench/tls_scan.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
