# `make run` sets everything up and runs Dreamloom; `make test` sets up and runs every test.
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: run test setup bench clean system-packages

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 (a CPU build on disk here) unless a torch is already installed in the venv.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,postgres]"
	touch $(STAMP)

# The demo grid goes through the studio (--publish), so a new install's gallery shows it; once per data directory.
DATA_DIR = $${DREAMLOOM_DATA_DIR:-data}

run: setup
	# A demo generation with the starter model (the first time), then the studio service (Ctrl-C stops it).
	@test -f "$(DATA_DIR)/.demo-published" || { \
	  $(VENV)/bin/dreamloom imagine "a red circle on a blue background --ar 3:2 --seed 7" --publish --user demo && \
	  touch "$(DATA_DIR)/.demo-published"; }
	$(VENV)/bin/dreamloom serve

test: setup system-packages
	$(PYTHON) -m pytest -q

# Tests need a PostgreSQL server (a private one is started from the Debian package's binaries) and a
# headless Chromium (Debian's, driven by Playwright). Installed here when missing.
system-packages:
	@missing=""; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  test -x /usr/bin/chromium || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
	    echo "warning: could not install$$missing; those tests fail in CI and are skipped elsewhere"; \
	  fi

bench: setup system-packages
	$(PYTHON) bench/engine_bench.py
	$(PYTHON) bench/queue_bench.py
	$(PYTHON) bench/serve_memory.py
	$(PYTHON) bench/gallery_bench.py
	$(PYTHON) bench/bot_bench.py
	$(PYTHON) bench/lora_bench.py
	$(PYTHON) bench/web_trust_bench.py
	$(PYTHON) bench/ecosystem_bench.py
	$(PYTHON) bench/learning_bench.py  # about 20 minutes on 2 CPU cores
	$(PYTHON) bench/learning_job_bench.py
	$(PYTHON) bench/routing_table_bench.py
	$(PYTHON) bench/routing_latency_bench.py
	$(PYTHON) bench/route_learning_bench.py
	$(PYTHON) bench/cache_bench.py
	$(PYTHON) bench/merge_bench.py
	$(PYTHON) bench/affinity_bench.py
	$(PYTHON) -m engine.training.kit_checks

clean:
	rm -rf $(VENV) data .pytest_cache
