# Two commands do everything on a fresh machine:
#   make serve   set up .venv, build the embedded default models, serve both tracks behind one gateway on :3000
#                (/a/v1, /b/v1, /v1; `make serve TRACK=a` or `TRACK=b` serves one track)
#   make test    set up .venv, build the embedded default models, run the whole test suite
PY := .venv/bin/python
UNIFIED_A := models/embedded/unified/track_a
MODEL_A := models/embedded/track_a
UNIFIED_B := models/embedded/unified/track_b
MODEL_B := models/embedded/track_b
PORT ?= 3000
TRACK ?= ab
BENTO_ab := combined
BENTO_a := track_a
BENTO_b := track_b
export BENTOML_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model serve test test-unit bench build mutation lint

setup:
	bash scripts/setup.sh

# The builder is itself idempotent (a no-op when up to date); conversion re-runs only when the build changed.
model: setup
	$(PY) -m hcxserve.tooling.embedded --track a --output $(UNIFIED_A)
	$(PY) -m hcxserve.tooling.embedded --track b --output $(UNIFIED_B)
	$(MAKE) --no-print-directory $(MODEL_A)/manifest.json $(MODEL_B)/manifest.json

$(MODEL_A)/manifest.json: $(UNIFIED_A)/.hcx-embedded.json
	$(PY) convert_model.py --input $(UNIFIED_A) --output $(MODEL_A) --track a --verify --force

# All five components: llm/ ve/ ae/, plus vd/ (decoder/vision) and ad/ (decoder/audio's archives, unpacked).
$(MODEL_B)/manifest.json: $(UNIFIED_B)/.hcx-embedded.json
	$(PY) convert_model.py --input $(UNIFIED_B) --output $(MODEL_B) --track b --verify --force

serve: model
	bash scripts/serve.sh bentos.$(BENTO_$(TRACK)):Gateway --port $(PORT)

test: model
	$(PY) -m pytest -ra

test-unit: setup
	$(PY) -m pytest -ra tests/unit tests/api

# The three bentos (bentofile.yaml: both tracks; bentofile.track_{a,b}.yaml), built with the GPU profile; no docker.
build: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .
	.venv/bin/bentoml build -f bentofile.yaml
	.venv/bin/bentoml build -f bentofile.track_a.yaml
	.venv/bin/bentoml build -f bentofile.track_b.yaml

# Mutation testing of the gateway's request pipeline, media fetching and the converter's verify ([tool.mutmut] in
# pyproject.toml); `.venv/bin/mutmut results` lists the survivors afterwards.
mutation: setup
	rm -rf mutants
	.venv/bin/mutmut run --max-children 2
	$(PY) scripts/mutation_score.py

lint: setup
	.venv/bin/ruff check hcxserve services bentos benchmarks tests scripts convert_model.py
