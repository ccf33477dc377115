# One target per stage; each is a thin call of the `avcache` CLI inside .venv (installed on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avcache-installed

OUT ?= runs/demo
DATA ?= $(OUT)/data
ITEMS ?= 24
SEED ?= 0
DATASET ?= synthetic
MANIFEST ?= $(OUT)/manifest.arrow
ALLOW_OUTSIDE_DATA ?=
STORE ?= $(OUT)/store
CONFIG ?=
RUNNER ?= auto
PYTEST_ARGS ?=
FEATURES ?=
FACTORY ?=
FEATURE_SET ?= clip_image
K ?= 10
SPLIT ?= test
INDEX_VECTORS ?= 1000000
RECIPE ?=
RUN ?= runs/$(or $(RECIPE),brewclip)
SET ?=
GRID ?=
SEEDS ?=
FROM ?=

.DEFAULT_GOAL := help
# `train` is also a folder (train/): without .PHONY make would take the target as up to date
.PHONY: help setup synth manifest extract info index search eval-retrieval train train-retrieval train-ser train-aligner aligner-efficiency train-generator ablate bench demo report test test-heavy lint test-browser clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(STAMP) ## install avcache and its dependencies into .venv
	@$(BIN)/python -c "import avcache.pipeline.cli, torch, torchvision, open_clip, ray, faiss, decord; print('avcache ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"

synth: $(STAMP) ## write the synthetic dataset: DATA=<dir> [ITEMS=<n>] [SEED=<s>] [VGGSOUND=1: with the VGGSound part] [LN_COCO=1: with the LN-COCO part]
	$(BIN)/avcache synth --data $(DATA) --items $(ITEMS) --seed $(SEED) $(if $(filter 1,$(VGGSOUND)),--vggsound) $(if $(filter 1,$(LN_COCO)),--ln-coco)

manifest: $(STAMP) ## build a manifest: DATASET=<synthetic|avsd|flickr8k_audio|spokencoco|ln_coco|esc50|urbansound8k|vggsound|ravdess|folder> DATA=<dir> MANIFEST=<file.arrow> [CLASSES=<file>: only these labels, one a line] [ALLOW_OUTSIDE_DATA=1: accept media outside DATA]
	$(BIN)/avcache manifest --dataset $(DATASET) --data $(DATA) --manifest $(MANIFEST) $(if $(CLASSES),--classes $(CLASSES)) $(if $(filter 1,$(ALLOW_OUTSIDE_DATA)),--allow-outside-data)

extract: $(STAMP) ## extract every feature set: MANIFEST=<file.arrow> STORE=<dir> [CONFIG=<file.yaml>]
	$(BIN)/avcache extract --manifest $(MANIFEST) --store $(STORE) --runner $(RUNNER) $(if $(CONFIG),--config $(CONFIG))

info: $(STAMP) ## read a store back and describe it: STORE=<dir>
	$(BIN)/avcache info --store $(STORE) --verify

index: $(STAMP) ## FAISS index per vector column, built or updated: STORE=<dir> [FEATURES=a,b] [FACTORY=<faiss string>]
	$(BIN)/avcache index --store $(STORE) $(if $(FEATURES),--feature-sets $(FEATURES)) $(if $(FACTORY),--factory "$(FACTORY)")

search: $(STAMP) ## top-K items: STORE=<dir> one of QUERY="<text>" IMAGE=<file> AUDIO=<file> QUERIES=<file> [FEATURE_SET=clip_image] [K=10] [JSON=1]
	$(BIN)/avcache search --store $(STORE) --feature-set $(FEATURE_SET) -k $(K) $(if $(QUERY),--text "$(QUERY)") \
		$(if $(IMAGE),--image "$(IMAGE)") $(if $(AUDIO),--audio "$(AUDIO)") $(if $(QUERIES),--queries "$(QUERIES)") $(if $(JSON),--json)

eval-retrieval: $(STAMP) ## zero-shot Whisper->CLIP retrieval + text upper bound: STORE=<dir> OUT=<dir> [SPLIT=test]
	$(BIN)/avcache eval-retrieval --store $(STORE) --out $(OUT) --split $(SPLIT)

TRAIN_ARGS = --store $(STORE) --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

train: $(STAMP) ## one method on cached features: RECIPE=<brewclip|ser|bgtai|avsd> STORE=<dir> [RUN=runs/<recipe>] [CONFIG=train/configs/<recipe>_*.yaml] [SET="k=v ..."]
	$(BIN)/avcache train --recipe "$(RECIPE)" $(TRAIN_ARGS)

# The targets before `make train RECIPE=...`, kept as its aliases.
train-retrieval: $(STAMP) ## = make train RECIPE=brewclip (BrewCLIP heads)
	$(BIN)/avcache train --recipe brewclip $(TRAIN_ARGS)

train-ser: $(STAMP) ## = make train RECIPE=ser (emotion classifier on the acoustic channel; SET="init_from=runs/brewclip ...")
	$(BIN)/avcache train --recipe ser $(TRAIN_ARGS)

train-aligner: $(STAMP) ## = make train RECIPE=bgtai (BGTAI aligner)
	$(BIN)/avcache train --recipe bgtai $(TRAIN_ARGS)

aligner-efficiency: $(STAMP) ## BGTAI Base / DS-Net / Result Filter / DS & RF, accuracy per epoch plotted: STORE=<dir> RUN=<dir>
	$(BIN)/avcache train-aligner --efficiency-study --store $(STORE) --run $(RUN) $(foreach s,$(SET),--set $(s))

train-generator: $(STAMP) ## = make train RECIPE=avsd (AVSD answers with cues + BART, DSTC scores)
	$(BIN)/avcache train --recipe avsd $(TRAIN_ARGS)

ablate: $(STAMP) ## every cell of a grid, table + plots in OUT: GRID=<train/grids/*.yaml or name> STORE=<dir> OUT=<dir> [SET="k=v ..."] [SEEDS=0,1]
	$(BIN)/avcache ablate --grid $(GRID) --store $(STORE) --out $(OUT) $(foreach s,$(SET),--set $(s)) $(if $(SEEDS),--seeds $(SEEDS))

bench: $(STAMP) ## extraction times, FAISS recall/QPS at 1M x 512, training from the store vs memory: OUT=<dir> [RUNNER=auto]
	$(BIN)/avcache bench --out $(OUT) --index-vectors $(INDEX_VECTORS) --runner $(RUNNER)

demo: $(STAMP) ## synth -> extract -> index -> zero-shot retrieval -> each method trained -> report: [OUT=<dir>]
	$(BIN)/avcache demo --out $(OUT) --items $(ITEMS) --seed $(SEED) --runner $(RUNNER)

report: $(STAMP) ## OUT/report.md + report_files/ + self-contained report.html from what is found: OUT=<dir> [FROM="dir1 dir2"]
	$(BIN)/avcache report --out $(OUT) $(if $(FROM),--from $(FROM))

test: $(STAMP) test-browser lint ## the layer contracts, then the test suite (all but the heavy tests)
	$(BIN)/python -m pytest -q -m "not heavy" $(PYTEST_ARGS)

test-heavy: $(STAMP) ## the heavy tests: a multi-node Ray cluster with a killed node, full-size seeded checkpoints (~2 min, 1.2 GB), memcheck of the synthetic encoder
	$(BIN)/python -m pytest -q -m heavy $(PYTEST_ARGS)

lint: $(STAMP) ## the one-way layers of docs/ARCHITECTURE.md (import-linter contracts in pyproject.toml)
	$(BIN)/lint-imports --no-cache

# Never fails: without chromium (no apt, not root, no network) tests/test_report.py's browser test skips, saying why.
test-browser: ## install Debian's chromium (headless report check in the tests) when it is missing
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt) for the report's headless-browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q chromium >/dev/null 2>&1; }; } && echo "chromium installed" || \
		echo "chromium could not be installed; the browser test will skip"; }

clean: ## remove runs/ (the .venv stays)
	rm -rf runs
