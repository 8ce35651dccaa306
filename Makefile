# `make test` and `make demo` each work as the only command on a fresh clone:
# they create .venv and install whatever is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prism-installed
# faiss-cpu here; on a GPU host: make install FAISS_EXTRA=gpu (never both: they share the module name)
FAISS_EXTRA ?= cpu
DEMO_DIR ?= prism-data/sample-catalog

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# The browser tests drive Debian's chromium (Playwright never downloads a browser here).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT  := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends

.PHONY: install browser test demo serve bench clean

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  $(APT) chromium || ($(SUDO) apt-get update && $(APT) chromium)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[$(FAISS_EXTRA),dev]'
	@touch $(STAMP)

test: install browser
	$(PY) -m pytest

# Until the OpenMoji demo lands (issue 4), the demo indexes a generated 1,000-product sample
# catalog with seeded random ViT-B-32 weights and searches it by one of its own images.
demo: install
	$(PY) benchmarks/sample_catalog.py $(DEMO_DIR) -n 1000
	$(VENV)/bin/prism index $(DEMO_DIR)/catalog.csv --model ViT-B-32:random
	$(VENV)/bin/prism search --image $(DEMO_DIR)/images/00042.png --target image -k 5
	@echo "Browse it: make serve, then open http://127.0.0.1:8000/"

serve: install
	$(VENV)/bin/prism serve

bench: install
	$(PY) benchmarks/embed_throughput.py
	$(PY) benchmarks/serve_latency.py

clean:
	rm -rf $(VENV) prism-data .pytest_cache
