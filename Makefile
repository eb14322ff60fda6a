# prefixtune: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
# Everything installs into .venv from exact pins (requirements.lock); Java (for METEOR) via apt if missing.

VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= $(if $(wildcard ../shared/data),../shared/data,)
STAMP    := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-quick soak clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# a dropped connection mid-download (seen on a 104 MB wheel) resumes, and the whole step is tried 3 times
	for try in 1 2 3; do $(PY) -m pip install -q --resume-retries 20 --no-deps -r requirements.lock && break; \
	  [ $$try = 3 ] && exit 1; echo "pip install failed (try $$try of 3); trying again"; sleep 10; done
	$(PY) -m pip install -q --no-deps -e .
	@command -v java >/dev/null || { echo "installing Java for METEOR (default-jre-headless)"; \
	  (apt-get update -qq && apt-get install -y -qq default-jre-headless) || \
	  echo "WARNING: no Java; METEOR/PTB-tokenized metrics will fail. Install a JRE (apt install default-jre-headless)."; }
	touch $(STAMP)

demo: install
	$(VENV)/bin/prefixtune demo --record results/demo $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not real" -p no:cacheprovider

bench: install
	$(if $(DATA_DIR),PREFIXTUNE_DATA=$(DATA_DIR),) $(PY) bench/run_all.py

bench-quick: install
	$(if $(DATA_DIR),PREFIXTUNE_DATA=$(DATA_DIR),) $(PY) bench/run_all.py --quick

# not part of `make test`: one server under a mixed workload for SOAK_MINUTES (default 30), then RSS
# growth, open files, threads and store consistency, written to bench/results/soak-<date>.json
SOAK_MINUTES ?= 30
soak: install
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) runs .pytest_cache
