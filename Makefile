# The two commands of the README: `make demo` and `make test`. Both create the virtualenv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin

export VTAG_HOME ?= $(CURDIR)/.demo
export AIRFLOW_HOME ?= $(VTAG_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PATH := $(BIN):$(PATH)

RAW := $(VTAG_HOME)/store/raw
PARQUET := $(VTAG_HOME)/store/parquet

.PHONY: install demo test airflow-db bench constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

airflow-db: install
	airflow db migrate > $(VTAG_HOME)/airflow-migrate.log 2>&1 || (cat $(VTAG_HOME)/airflow-migrate.log; exit 1)

# Main job on the embedded defaults: synthetic shards -> the yt8m_ingest DAG -> Parquet + manifest.
demo: install
	mkdir -p $(VTAG_HOME)
	vtag synth --out $(RAW) --level frame --split train --shards 4 --videos-per-shard 64
	vtag synth --out $(RAW) --level frame --split validate --shards 1 --videos-per-shard 64
	$(MAKE) --no-print-directory airflow-db
	airflow dags test yt8m_ingest -c '{"src": "$(RAW)", "dest": "$(PARQUET)"}' > $(VTAG_HOME)/ingest-run.log 2>&1 \
		|| (tail -50 $(VTAG_HOME)/ingest-run.log; exit 1)
	@grep -E "shards to convert|DagRun Finished" $(VTAG_HOME)/ingest-run.log || true
	vtag manifest --dest $(PARQUET)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.ingest_throughput

constraints:
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -iE '^(torch|vtag)[=@ ]'; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VTAG_HOME)
