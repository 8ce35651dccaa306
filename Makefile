# `make test` and `make demo` each work as the only command on a fresh clone:
# they create .venv and install whatever is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prism-installed
# faiss-cpu here; on a GPU host: make install FAISS_EXTRA=gpu (never both: they share the module name)
FAISS_EXTRA ?= cpu

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# The browser tests drive Debian's chromium (Playwright never downloads a browser here).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT  := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends

.PHONY: install unicode browser test test-postgres reliability demo serve bench bench-full bench-env bench-feedback bench-scale bench-ray clean

install: $(STAMP) unicode

# The demo catalog's names and categories: Unicode's emoji-test.txt and CLDR keywords (Debian).
unicode:
	@test -f /usr/share/unicode/emoji/emoji-test.txt -a -d /usr/share/unicode/cldr/common/annotations || \
	  $(APT) unicode-data unicode-cldr-core || ($(SUDO) apt-get update && $(APT) unicode-data unicode-cldr-core)

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  $(APT) chromium || ($(SUDO) apt-get update && $(APT) chromium)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[$(FAISS_EXTRA),dev]'
	@touch $(STAMP)

# With PRISM_TEST_DATABASE_URL set (a PostgreSQL server URL whose user may CREATE DATABASE), the
# whole suite runs a second time against PostgreSQL, one fresh database per PRISM_HOME.
test: install browser
	$(PY) -m pytest
	@if [ -n "$$PRISM_TEST_DATABASE_URL" ]; then \
	  echo "== the suite again, against PostgreSQL"; $(PY) -m pytest --database postgresql; fi

# SQLite and PostgreSQL, with a throwaway server on loopback (Debian's postgresql, installed if missing).
test-postgres: install browser
	.ci/with-postgres $(MAKE) --no-print-directory test

# Faults and load at full size (~15 minutes here): SIGKILL mid event stream, mid index / build /
# retrain, version swaps under load, fuzzing; SQLite and PostgreSQL. Writes docs/reliability.md.
reliability: install
	.ci/with-postgres $(PY) benchmarks/reliability.py

# The OpenMoji catalog, the demo model (trained once, ~5 minutes on 2 cores, then reused), the
# index, and the search page at http://127.0.0.1:8000/ (Ctrl-C stops it).
demo: install
	$(VENV)/bin/prism demo

serve: install
	$(VENV)/bin/prism serve

# The alternatives (clip-retrieval, autofaiss) live in their own environment, never in Prism's.
bench-env: install
	$(PY) benchmarks/compare_env.py

# Everything at reduced sizes: ~25 minutes on 2 cores (~10 more the first time: demo model, compare env),
# then BENCHMARKS.md. The demo home gives the real-data ANN rows and the HTTP batching load.
bench: bench-env
	$(VENV)/bin/prism demo --no-serve
	$(PY) benchmarks/demo_spot_checks.py
	$(PY) benchmarks/embed_throughput.py
	$(PY) benchmarks/ann_scale.py
	$(PY) benchmarks/query_batching.py
	$(PY) benchmarks/serve_latency.py
	$(PY) benchmarks/canary_sim.py
	$(PY) benchmarks/report.py

# The issue's sizes: 2,000 images x 3 rounds, 1M vectors (about an hour here).
bench-full: bench-env
	$(VENV)/bin/prism demo --no-serve
	$(PY) benchmarks/embed_throughput.py --full
	$(PY) benchmarks/ann_scale.py --full
	$(PY) benchmarks/query_batching.py --seconds 20 --rounds 3
	$(PY) benchmarks/report.py

# Millions of products: `prism index --vectors` on a synthetic catalog generated chunk-wise in
# /tmp/prism-scale (1M and 10M: ~25 GB of disk, ~1.5 hours here), then serving figures.
bench-scale: install
	$(PY) benchmarks/scale.py --n 1000000 --n 10000000

# `prism index --ray` on a local Ray cluster (1 and 2 worker nodes of 1 CPU) against the local run,
# and a worker killed mid-job: 400 products, ~6 minutes here. Ray comes with the dev extra.
bench-ray: install
	$(PY) benchmarks/ray_scale.py

bench-feedback: install
	$(PY) benchmarks/feedback_lift.py --home prism-data-lift --demo-limit 300 --demo-epochs 40 --shoppers zh,colloquial,typo,catalog \
	  --train-queries 1500 --eval-queries 100 --nights 4 --min-clicks 1 --retrain-epochs 5

clean:
	rm -rf $(VENV) prism-data prism-data-lift prism-data-bench-vit .pytest_cache
