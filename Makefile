# The two entry points of README.md. PYTHON may point at a virtual environment.
PYTHON ?= python3
MODEL ?= ds4flash.gguf

.PHONY: install serve test

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# Installs, then starts the OpenAI/Anthropic-compatible server on 127.0.0.1:8000.
serve: install
	ds4-server -m $(MODEL)

# Installs, then runs the default (CPU-only) test suite.
test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider
