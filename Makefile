# Two commands do everything on a fresh machine with only Python 3.11+:
#   make demo   - venv, install, synthetic dataset, full pipeline on the offline teacher
#   make test   - venv, install, the whole test suite (starts its own Redis when none is given)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser netns demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/producer demo --out demo-out

# The preview gallery is checked in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it (Debian: apt-get install chromium) for the preview test"; fi; }

# The cross-host tests put Redis and the workers in network namespaces: iproute2's `ip`, as root.
netns:
	@command -v ip >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "iproute2 is missing: install it (Debian: apt-get install iproute2) for the cross-host tests (run as root)"; fi; }

test: install browser netns
	$(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf demo-out .pytest_cache
