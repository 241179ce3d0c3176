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
INGEST_CONF := {"src": "$(RAW)", "dest": "$(PARQUET)"}
TRAIN_CONF := {"data": "$(PARQUET)", "level": "frame", "preset": "small", "max_frames": 100}
INFER_CONF := {"top_k": 20}
VOCABULARY ?= $(CURDIR)/../shared/yt8m/vocabulary.csv

.PHONY: install tools lint demo demo-segments segments-on-defaults test airflow-db airflow screenshots bench gpu-bundle gpu-check real-video real-video-tuning constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Debian tools the tests drive: docker-compose (validates docker/compose.yaml; no engine needed) and
# headless Chromium (the browser test of the Airflow UI). Installed once, as root, from Debian's packages.
DEBIAN_TOOLS := docker-compose chromium
tools:
	@missing=""; for tool in $(DEBIAN_TOOLS); do command -v $$tool > /dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $$missing > /dev/null \
			|| { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends $$missing > /dev/null; } \
			|| { echo "could not install$$missing (run as root, or install them yourself)"; exit 1; }; \
	fi

# Airflow's metadata database, the pool the GPU tasks run in (a scheduler never runs them without it),
# and our schema (tasks check it, never migrate it).
airflow-db: install
	airflow db migrate > $(VTAG_HOME)/airflow-migrate.log 2>&1 || (cat $(VTAG_HOME)/airflow-migrate.log; exit 1)
	airflow pools set gpu 1 "GPU tasks: training and nightly inference" > /dev/null
	$(BIN)/vtag db upgrade > /dev/null

# Main job on the embedded defaults: synthetic shards -> yt8m_ingest -> yt8m_train (train, register,
# evaluate, promote) -> yt8m_nightly_inference through Airflow, then a few tagged videos from the database.
# The small preset runs on a CPU in a few minutes.
demo: install
	mkdir -p $(VTAG_HOME)
	vtag synth --out $(RAW) --level frame --split train --shards 8 --videos-per-shard 128 > /dev/null
	vtag synth --out $(RAW) --level frame --split validate --shards 1 --videos-per-shard 256 > /dev/null
	$(MAKE) --no-print-directory airflow-db
	$(call airflow_run,yt8m_ingest,$(INGEST_CONF))
	vtag manifest --dest $(PARQUET)
	$(call airflow_run,yt8m_train,$(TRAIN_CONF))
	vtag models
	@if [ -f "$(VOCABULARY)" ]; then vtag vocabulary $(VOCABULARY); else echo "no $(VOCABULARY): labels stay unnamed"; fi
	$(call airflow_run,yt8m_nightly_inference,$(INFER_CONF))
	vtag query runs limit=3
	vtag query tagged_videos limit=12

# Segment tagging on the embedded defaults (issue 26), in a home of its own beside the demo's: segment-rated
# synthetic shards in Google's format -> yt8m_ingest -> yt8m_train -> yt8m_nightly_inference keeping each
# video's best 20 segments, then the segment mAP of the night's segments.csv over the validate split's rated
# segments, and where the model places a label, from the database.
SEGMENTS_HOME := $(CURDIR)/.demo-segments
SEGMENT_SYNTH := --level frame --segments --num-labels 8 --videos-per-shard 100
SEGMENT_TRAIN_CONF := {"data": "$(PARQUET)", "level": "frame", "preset": "small", "max_frames": 100, "epochs": 3}
SEGMENT_INFER_CONF := {"top_k": 20, "segments": 20}

demo-segments: install
	@$(MAKE) --no-print-directory segments-on-defaults VTAG_HOME=$(SEGMENTS_HOME) AIRFLOW_HOME=$(SEGMENTS_HOME)/airflow

segments-on-defaults:
	mkdir -p $(VTAG_HOME)
	vtag synth --out $(RAW) --split train --shards 4 $(SEGMENT_SYNTH) > /dev/null
	vtag synth --out $(RAW) --split validate --shards 1 $(SEGMENT_SYNTH) > /dev/null
	$(MAKE) --no-print-directory airflow-db
	$(call airflow_run,yt8m_ingest,$(INGEST_CONF))
	$(call airflow_run,yt8m_train,$(SEGMENT_TRAIN_CONF))
	@if [ -f "$(VOCABULARY)" ]; then vtag vocabulary $(VOCABULARY); else echo "no $(VOCABULARY): labels stay unnamed"; fi
	$(call airflow_run,yt8m_nightly_inference,$(SEGMENT_INFER_CONF))
	vtag evaluate --segments --submission $$(ls -d $(VTAG_HOME)/store/exports/*/segments.csv | tail -1) --data $(PARQUET)
	@video=$$(vtag query tagged_videos limit=1 | sed -n 2p | cut -d' ' -f1); \
	echo "vtag query video_segments video_id=$$video"; vtag query video_segments video_id=$$video; \
	label=$$(vtag query video_segments video_id=$$video | sed -n 2p | tr -s ' ' | cut -d' ' -f4); \
	echo "vtag query label_top_segments label_id=$$label limit=5"; vtag query label_top_segments label_id=$$label limit=5

# $(call airflow_run,DAG_ID,CONF): one DAG run in-process, its log kept under $(VTAG_HOME); no night deadline
# (Airflow 3.3.2's dags test fails at the end of a run of a DAG with deadline=).
define airflow_run
	@echo "airflow dags test $(1) (log: $(VTAG_HOME)/$(1).log)"
	@VTAG_NIGHT_DEADLINE= airflow dags test $(1) -c '$(2)' > $(VTAG_HOME)/$(1).log 2>&1 || (tail -40 $(VTAG_HOME)/$(1).log; exit 1)
	@grep -E "DagRun Finished" $(VTAG_HOME)/$(1).log | sed -E 's/.*(dag_id=[^,]+).*(state=[a-z]+).*/\1 \2/'
endef

# The Airflow UI on the embedded defaults, our DAGs unpaused; Ctrl-C stops every process it started.
# The nightly DAG starts today here, so that a first start does not catch up on every night since November.
airflow: install
	mkdir -p $(VTAG_HOME)
	VTAG_NIGHTLY_START=$$(date -u +%Y-%m-%d) $(BIN)/python -m airflow_glue.local_airflow

# ruff (pinned in the dev extras, configured in pyproject.toml): lint and format are checked before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install tools lint
	$(BIN)/python -m pytest -q

# The README's screenshots (docs/screenshots/<page>-<light|dark>.png): the Video tags pages over `make demo`'s
# data (made first if $(VTAG_HOME) has none), in a local Airflow, through headless Chromium, in both themes.
# The review flow's pictures (review.png, model_reviewed.png, nav.png) come from the browser tests:
# VTAG_TEST_OUTPUT=docs/screenshots pytest tests/test_ui_browser.py.
screenshots: install tools
	test -f $(VTAG_HOME)/vtag.db || $(MAKE) --no-print-directory demo
	$(BIN)/python -m tests.support.screenshots --vtag-home $(VTAG_HOME) --out $(CURDIR)/docs/screenshots

# The one prepared GPU run (docs/benchmarks.md#on-a-lent-gpu-machine). Here, with a network: `make gpu-bundle`
# downloads the wheels it needs beyond the lent machine's image into .gpu-bundle/ (at most 40 MiB; carry it).
# There, with that machine's own Python and no network: `make gpu-check GPU_PYTHON=python3 GPU_OUT=$OUT` (or
# `python3 -m benchmarks.gpu_run --out-dir $OUT`) makes an environment from the bundle and runs
# benchmarks/gpu_check.py within 9 minutes, writing gpu-check.json and gpu-check.txt into GPU_OUT. Without
# GPU_PYTHON the project's venv runs it.
GPU_BUNDLE ?= $(CURDIR)/.gpu-bundle
GPU_OUT ?= $(CURDIR)/gpu-check
GPU_PYTHON ?=
gpu-bundle:
	$(PYTHON) -m benchmarks.gpu_bundle --out $(GPU_BUNDLE)

gpu-check:
	$(if $(GPU_PYTHON),,$(MAKE) --no-print-directory install)
	$(or $(GPU_PYTHON),$(BIN)/python) -m benchmarks.gpu_run --bundle $(GPU_BUNDLE) --out-dir $(GPU_OUT)

bench: install
	$(BIN)/python -m benchmarks.ingest_throughput
	$(BIN)/python -m benchmarks.parquet_layout
	$(BIN)/python -m benchmarks.train_throughput

# The video-level model on the 150 real shards in ../shared, split three ways by shard: train on
# validate0000-0099, tune on 0100-0129, report on 0130-0149, ingested into a Parquet root of their own that
# no training run is pointed at. `real-video-tuning` is how the recipe was chosen (train on 0000-0099, score
# 0100-0129); `real-video` is what we report: the default recipe (`video`) and the two baselines of Google's
# starter, each trained on 0000-0129 with what tuning chose and scored on the held-out shards, in one run
# (the baselines first: they take minutes, the four chained MLPs most of the run).
REAL := $(VTAG_HOME)/real
REAL_DB := sqlite:///$(REAL)/vtag.db
REAL_SHARDS := $(CURDIR)/../shared/yt8m/video_level
REAL_PRESETS := starter-logistic starter-mlp video

$(REAL)/.ingested: | install
	mkdir -p $(REAL)
	vtag db upgrade --db $(REAL_DB) > /dev/null
	vtag ingest --src $(REAL_SHARDS) --pattern 'validate00??.tfrecord' --dest $(REAL)/train --db $(REAL_DB)
	vtag ingest --src $(REAL_SHARDS) --pattern 'validate01[0-2]?.tfrecord' --dest $(REAL)/train --db $(REAL_DB)
	vtag ingest --src $(REAL_SHARDS) --pattern 'validate01[34]?.tfrecord' --dest $(REAL)/held-out --db $(REAL_DB)
	touch $@

# $(call real_video,MODELS,TRAIN_PATTERN,EVAL_DATA,EVAL_PATTERN,LABEL): each preset trained and scored.
define real_video
	@set -o pipefail; for preset in $(REAL_PRESETS); do \
		echo "training $$preset on $(2):"; \
		vtag train --data $(REAL)/train --level video --split validate --pattern '$(2)' \
			--preset $$preset --out $(REAL)/$(1)/$$preset --db $(REAL_DB) || exit 1; \
	done; \
	for preset in $(REAL_PRESETS); do \
		printf '%-16s %-8s ' $$preset $(5); \
		vtag evaluate --checkpoint $(REAL)/$(1)/$$preset/last.pt --data $(3) --split validate \
			--pattern '$(4)' --db $(REAL_DB) | grep '^model version' || exit 1; \
	done
endef

real-video-tuning: install $(REAL)/.ingested
	$(call real_video,tuning-models,validate00??.parquet,$(REAL)/train,validate01[0-2]?.parquet,tuning)

real-video: install $(REAL)/.ingested
	$(call real_video,held-out-models,*.parquet,$(REAL)/held-out,*.parquet,held-out)

constraints:
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -iE '^(torch|vtag)[=@ ]'; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VTAG_HOME)
