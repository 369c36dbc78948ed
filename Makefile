# vitalproof: `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
VENV ?= .venv
PY := $(VENV)/bin/python
VP := $(VENV)/bin/vitalproof

WEB_VENDOR := clinic/web/static/vendor

.PHONY: install system fetch-start fetch web screenshots demo test test-unit lint bench clean stack-up stack-down

install: system $(VENV)/.installed fetch-start $(VENV)/.native node_modules/.installed web fetch

system:
	@bash scripts/install-system.sh

$(VENV)/.installed: pyproject.toml verifier/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./verifier
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The Rust hashing extension (native/, PyO3 + maturin). Cargo comes from rustup, which may not be
# on a non-login PATH; pip fetches maturin for the build. tests/test_native.py fails without it.
$(VENV)/.native: $(VENV)/.installed native/pyproject.toml native/Cargo.toml native/Cargo.lock \
		$(wildcard native/src/*.rs) native/vitalproof_native.pyi
	@PATH="$$HOME/.cargo/bin:$$PATH" command -v cargo >/dev/null || { \
		echo "make: cargo (Rust >= 1.85) not found: install it with rustup to build native/"; exit 1; }
	PATH="$$HOME/.cargo/bin:$$PATH" $(PY) -m pip install -q ./native
	@touch $@

# `npm install`, not `npm ci`: npm 11 drops other platforms' optional packages (Anvil ships one
# per OS) from the lock file and then `npm ci` refuses it as out of sync. Versions are pinned
# exactly in package.json, and the lock file is honoured.
node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	@touch $@

# The dashboard's JavaScript, from npm into the package (served by `vitalproof serve`, never
# fetched from a CDN): uPlot for the charts.
web: $(WEB_VENDOR)/uPlot.iife.min.js $(WEB_VENDOR)/uPlot.min.css

$(WEB_VENDOR)/%: node_modules/.installed
	@mkdir -p $(WEB_VENDOR)
	cp node_modules/uplot/dist/$* $@

kafka: $(VENV)/.installed
	$(VP) stack fetch

# Kafka's jars (mvn) and SeaweedFS's weed (the lake's S3 server: `stack up --s3`, the S3 lake
# tests; built by go from the module proxy, ~6 min with go's caches cold) are fetched in the
# background while the rest installs; `fetch` waits for them (seconds once they are cached).
FETCH := .vitalproof/fetch
fetch-start: $(VENV)/.installed
	@mkdir -p .vitalproof && rm -f $(FETCH).rc
	@setsid sh -c '$(VP) stack fetch --s3 > $(FETCH).log 2>&1; echo $$? > $(FETCH).rc' \
		< /dev/null > /dev/null 2>&1 &

fetch: fetch-start
	@while [ ! -f $(FETCH).rc ]; do sleep 2; done
	@cat $(FETCH).log
	@test "$$(cat $(FETCH).rc)" = 0

demo: install
	$(VP) demo

# Two processes (pytest-xdist), each with its own session stack on free ports: most of the
# suite waits on brokers and chains, so two share the two cores well. A file stays in one
# process (--dist loadfile), so module-scoped fixtures (the browser) are made once.
test: install
	$(PY) -m pytest -n 2 --dist loadfile

# The dashboard's browser tests, saving their screenshots of each view into docs/img.
screenshots: install
	VITALPROOF_SCREENSHOTS=docs/img $(PY) -m pytest -m browser

# No brokers, no chain node, no slow attack tests: what to run after every edit (< 90 s).
test-unit: $(VENV)/.installed $(VENV)/.native
	$(PY) -m pytest -m "not integration and not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict verifier/vitalproof_verify
	$(VENV)/bin/lint-imports

bench: install
	$(PY) bench/merkle_bench.py
	$(PY) bench/lake_bench.py

stack-up: install
	$(VP) stack up

stack-down:
	$(VP) stack down

clean:
	-$(VP) stack down
	rm -rf .vitalproof
