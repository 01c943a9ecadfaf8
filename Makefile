# Two commands do everything on a fresh machine:
#   make serve   set up .venv, build the embedded default models (tracks A and B), serve track A on :3000
#                (`make serve TRACK=b` serves track B)
#   make test    set up .venv, build the embedded default models, run the whole test suite
PY := .venv/bin/python
UNIFIED_A := models/embedded/unified/track_a
MODEL_A := models/embedded/track_a
UNIFIED_B := models/embedded/unified/track_b
MODEL_B := models/embedded/track_b
PORT ?= 3000
TRACK ?= a
export BENTOML_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model serve test test-unit bench build

setup:
	bash scripts/setup.sh

# The builder is itself idempotent (a no-op when up to date); conversion re-runs only when the build changed.
model: setup
	$(PY) -m hcxserve.embedded --track a --output $(UNIFIED_A)
	$(PY) -m hcxserve.embedded --track b --output $(UNIFIED_B)
	$(MAKE) --no-print-directory $(MODEL_A)/manifest.json $(MODEL_B)/manifest.json

$(MODEL_A)/manifest.json: $(UNIFIED_A)/.hcx-embedded.json
	$(PY) convert_model.py --input $(UNIFIED_A) --output $(MODEL_A) --track a --verify --force

# The embedded track B checkpoint has no decoders (decoder/vision, decoder/audio) yet: vd/ and ad/ are left out.
$(MODEL_B)/manifest.json: $(UNIFIED_B)/.hcx-embedded.json
	$(PY) convert_model.py --input $(UNIFIED_B) --output $(MODEL_B) --track b --components llm ve ae --verify --force

serve: model
	bash scripts/serve.sh bentos.track_$(TRACK):Track$(shell echo $(TRACK) | tr ab AB)Gateway --port $(PORT)

test: model
	$(PY) -m pytest -ra

test-unit: setup
	$(PY) -m pytest -ra tests/unit

build: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .
	HCX_CONFIG=configs/track_a.yaml .venv/bin/bentoml build -f bentofile.yaml
	HCX_CONFIG=configs/track_b.yaml .venv/bin/bentoml build -f bentofile.track_b.yaml
