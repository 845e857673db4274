# The two commands a newcomer needs: `make demo` and `make test` (the fast tier; CI runs
# `make test-all`, every test).
# Both create .venv on first use and install the project into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo serve test test-all lint install clean secrets

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The pipeline on demo-data/, then the search page until Ctrl-C; DEMO_ARGS=--no-serve
# stops after the pipeline. `make serve` reopens the page on the demo data.
DEMO_ARGS ?=
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_ARGS)

serve: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh --serve-only

# The browser test drives Debian's Chromium (Playwright's own browser download cannot
# run here). Installed once when missing; without root it is left to the person.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "could not install chromium: the browser test will not run"; \
	else echo "chromium is missing: apt-get install chromium to run the browser test"; fi

# promtool and prometheus (Debian's prometheus package) check and unit-test the alert
# rules of deploy/prometheus and scrape a real process in tests/test_alerts.py.
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) \
	    || echo "could not install prometheus: the alert rule tests will not run"; \
	else echo "promtool is missing: apt-get install prometheus to run the alert tests"; fi

# `make test`: the fast tier (unit tests, the embedded shape, one page smoke), minutes on
# 2 cores. `make test-all`: every test (server shapes, real photos, browser, training runs),
# what CI runs, on TEST_WORKERS (2) pytest-xdist workers (each module whole on one
# worker; TEST_WORKERS=0: one process; docs/TESTING.md). PYTEST_ARGS passes more (PYTEST_ARGS='-k drift -x').
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest --durations=30

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PYTEST) -m "not full" $(PYTEST_ARGS)

test-all: $(STAMP) | $(CHROMIUM) $(PROMTOOL)
	$(VENV)/bin/ruff check .
	$(PYTEST) $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder) $(PYTEST_ARGS)

# Random credentials for docker-compose.yml in the git-ignored secrets/ (kept when they
# exist; SECRETS_ARGS=--force rewrites them, SECRETS_ARGS='--ui-user NAME' names the login).
SECRETS_ARGS ?=
secrets:
	$(PYTHON) scripts/make_secrets.py $(SECRETS_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf demo-data .pytest_cache .ruff_cache
