# Two entry points, both usable on a fresh machine (only the package registries are needed):
#   make demo   set up .venv, then run the main job on the built-in mini QoQ-Med model
#   make test   set up .venv, then run the test suite (pytest)
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup demo test bench clean

# torch is installed first and pinned: 2.13.0 is the CPU wheel; letting pip resolve a range
# with no torch present would pull a multi-GB CUDA build. llama-cpp-python compiles from
# source once (~3.5 min on 2 cores) and pip caches the wheel afterwards.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $@

setup: $(VENV)/.installed

# The main job, on the built-in mini QoQ-Med: train it (cached), export GGUF (Q4_K_M + Q8_0 + mmproj,
# clinical imatrix) and GPTQ 4-bit, ask llama.cpp a CT question, bench every build against the
# original (drift per clinical domain + speed, each in its own runtime), render the report with its
# plots (Markdown + PNGs in $(OUT)/report).
demo: setup
	$(VENV)/bin/qoqopt mini --out $(OUT)/mini --preset tiny --train --force
	$(VENV)/bin/qoqopt info $(OUT)/mini
	$(VENV)/bin/qoqopt export $(OUT)/mini --format gguf --quant Q4_K_M,Q8_0 --out $(OUT)/mini-gguf --force
	$(VENV)/bin/qoqopt export $(OUT)/mini --format gptq --bits 4 --out $(OUT)/mini-gptq --force
	$(VENV)/bin/qoqopt ask $(OUT)/mini-gguf --quant Q4_K_M --item ct-abd-pancreas.region_ct.eval-0
	rm -rf $(OUT)/results  # one fresh run; copy result files from other machines in before `report`
	$(VENV)/bin/qoqopt bench $(OUT)/mini --variants bf16,gguf:Q4_K_M,gguf:Q8_0,gptq:4 \
		--from $(OUT)/mini-gguf --from $(OUT)/mini-gptq --out $(OUT)/results
	$(VENV)/bin/qoqopt report $(OUT)/results/*.json --out $(OUT)/report

# Timing suites (not tests): pytest-benchmark groups, each op beside its peer in the same run.
bench: setup
	mkdir -p $(OUT)
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=$(OUT)/benchmarks.json -q

test: setup
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(OUT) .pytest_cache
