# Two commands do everything on a fresh machine:
#   make serve   set up .venv, build the embedded default model, serve track A on :3000
#   make test    set up .venv, build the embedded default model, run the whole test suite
PY := .venv/bin/python
UNIFIED_A := models/embedded/unified/track_a
MODEL_A := models/embedded/track_a
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model serve test test-unit bench build

setup:
	bash scripts/setup.sh

# The builder is itself idempotent (a no-op when up to date); conversion re-runs only when the build changed.
model: setup
	$(PY) -m hcxserve.embedded --track a --output $(UNIFIED_A)
	$(MAKE) --no-print-directory $(MODEL_A)/manifest.json

$(MODEL_A)/manifest.json: $(UNIFIED_A)/.hcx-embedded.json
	$(PY) convert_model.py --input $(UNIFIED_A) --output $(MODEL_A) --track a --verify --force

serve: model
	bash scripts/serve.sh bentos.track_a:TrackAGateway --port $(PORT)

test: model
	$(PY) -m pytest -ra

test-unit: setup
	$(PY) -m pytest -ra tests/unit

build: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .
	HCX_CONFIG=configs/track_a.yaml .venv/bin/bentoml build -f bentofile.yaml
