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
RUNNER ?= ray
PYTEST_ARGS ?=
FEATURES ?=
FACTORY ?=
FEATURE_SET ?= clip_image
K ?= 10
SPLIT ?= test
INDEX_VECTORS ?= 1000000
RUN ?= runs/brewclip
SET ?=
GRID ?=
SEEDS ?=
FROM ?=

.DEFAULT_GOAL := help
.PHONY: help setup synth manifest extract info index search eval-retrieval train-retrieval train-ser train-aligner aligner-efficiency train-generator ablate bench demo report test test-browser clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(STAMP) ## install avcache and its dependencies into .venv
	@$(BIN)/python -c "import avcache.pipeline.cli, torch, torchvision, open_clip, ray, faiss, decord; print('avcache ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"

synth: $(STAMP) ## write the synthetic dataset: DATA=<dir> [ITEMS=<n>] [SEED=<s>]
	$(BIN)/avcache synth --data $(DATA) --items $(ITEMS) --seed $(SEED)

manifest: $(STAMP) ## build a manifest: DATASET=<synthetic|avsd|flickr8k_audio|spokencoco|esc50|ravdess|folder> DATA=<dir> MANIFEST=<file.arrow> [ALLOW_OUTSIDE_DATA=1: accept media outside DATA]
	$(BIN)/avcache manifest --dataset $(DATASET) --data $(DATA) --manifest $(MANIFEST) $(if $(filter 1,$(ALLOW_OUTSIDE_DATA)),--allow-outside-data)

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

train-retrieval: $(STAMP) ## BrewCLIP heads on cached features: STORE=<dir> RUN=<dir> [CONFIG=train/configs/brewclip_*.yaml] [SET="k=v ..."]
	$(BIN)/avcache train-retrieval --store $(STORE) --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

train-ser: $(STAMP) ## emotion classifier on the acoustic channel: STORE=<dir> RUN=<dir> [CONFIG=...] [SET="init_from=runs/brewclip ..."]
	$(BIN)/avcache train-ser --store $(STORE) --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

train-aligner: $(STAMP) ## BGTAI aligner on cached features: STORE=<dir> RUN=<dir> [CONFIG=train/configs/bgtai_*.yaml] [SET="k=v ..."]
	$(BIN)/avcache train-aligner --store $(STORE) --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

aligner-efficiency: $(STAMP) ## BGTAI Base / DS-Net / Result Filter / DS & RF, accuracy per epoch plotted: STORE=<dir> RUN=<dir>
	$(BIN)/avcache train-aligner --efficiency-study --store $(STORE) --run $(RUN) $(foreach s,$(SET),--set $(s))

train-generator: $(STAMP) ## AVSD answers with cues + BART, DSTC scores: STORE=<dir> RUN=<dir> [CONFIG=train/configs/avsd_*.yaml] [SET="k=v ..."]
	$(BIN)/avcache train-generator --store $(STORE) --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

ablate: $(STAMP) ## every cell of a grid, table + plots in OUT: GRID=<train/grids/*.yaml or name> STORE=<dir> OUT=<dir> [SET="k=v ..."] [SEEDS=0,1]
	$(BIN)/avcache ablate --grid $(GRID) --store $(STORE) --out $(OUT) $(foreach s,$(SET),--set $(s)) $(if $(SEEDS),--seeds $(SEEDS))

bench: $(STAMP) ## extraction times, FAISS recall/QPS at 1M x 512, training from the store vs memory: OUT=<dir>
	$(BIN)/avcache bench --out $(OUT) --index-vectors $(INDEX_VECTORS)

demo: $(STAMP) ## synth -> extract -> index -> zero-shot retrieval -> each method trained -> report: [OUT=<dir>]
	$(BIN)/avcache demo --out $(OUT) --items $(ITEMS) --seed $(SEED) --runner $(RUNNER)

report: $(STAMP) ## OUT/report.md + report_files/ + self-contained report.html from what is found: OUT=<dir> [FROM="dir1 dir2"]
	$(BIN)/avcache report --out $(OUT) $(if $(FROM),--from $(FROM))

test: $(STAMP) test-browser ## run the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Never fails: without chromium (no apt, not root, no network) tests/test_report.py's browser test skips, saying why.
test-browser: ## install Debian's chromium (headless report check in the tests) when it is missing
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt) for the report's headless-browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q chromium >/dev/null 2>&1; }; } && echo "chromium installed" || \
		echo "chromium could not be installed; the browser test will skip"; }

clean: ## remove runs/ (the .venv stays)
	rm -rf runs
