# megafork developer commands. `make test` and `make demo` install everything they need.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# The CPU wheel. On a GPU machine override it, e.g. `make setup TORCH=torch==2.11.0`.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

# `make gpu-check` runs on the GPU image's python (torch with CUDA); DEVICE=cpu rehearses in .venv.
DEVICE  ?= cuda
GPU_PY  ?= python3

.PHONY: setup test demo ablation bench lint clean gpu-wheels gpu-check sglang-contract

setup: $(STAMP)

# Torch goes in first and is pinned again beside the project, so no dependency can pull a CUDA
# build. The stamp makes `make setup` idempotent; it is redone when the build inputs change.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev]" "$(TORCH)"
	$(VPY) -c "import megafork._C, megatron.core, transformers; print('megafork setup ok')"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest tests --durations=15 $(PYTEST_ARGS)

# SGLang 0.5.23's own server-side code against megafork's client, sender and server, on CPU.
# The wheel goes --no-deps into its own folder (never into .venv: it pins a CUDA torch), with the
# small pieces it imports; the venv's CPU torch is reused through PYTHONPATH. Cached by a stamp.
# Not part of `make test` (the first install alone takes minutes); .ci/run runs it as its own step.
SGL_DIR   := .sglang-contract
SGL_STAMP := $(SGL_DIR)/.stamp
SGL_REQ   := contract/sglang/requirements.txt

$(SGL_STAMP): $(SGL_REQ) | $(STAMP)
	rm -rf $(SGL_DIR)/site
	$(VPY) -m pip install -q --no-deps --target $(SGL_DIR)/site -r $(SGL_REQ)
	touch $(SGL_STAMP)

sglang-contract: setup $(SGL_STAMP)
	SGLANG_CONTRACT_SITE=$(SGL_DIR)/site $(VPY) tools/gen_sglang_fields.py --sglang-dir $(SGL_DIR)/site/sglang --check
	SGLANG_CONTRACT_SITE=$(SGL_DIR)/site $(VPY) -m pytest contract/sglang -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(VPY) -m megafork.demo

# The paper's token ablation at toy scale: 7 rows x 3 seeds x 40 steps (resumes; ~40 min on 2 quiet cores).
ablation: setup
	$(VPY) -m megafork.demo ablation $(ABLATION_ARGS)

bench: setup
	$(VPY) -m bench

# Every wheel beyond a stock CUDA torch image, for CPython 3.12 (< 60 MiB; see tools/gpu_wheels.py).
gpu-wheels: setup
	$(VPY) tools/gpu_wheels.py --out .gpu-wheels

# Offline validation of a GPU machine in under 8 minutes (see tools/gpu_check.py).
ifeq ($(DEVICE),cpu)
gpu-check: setup
	$(VPY) tools/gpu_check.py --device cpu
else
gpu-check:
	$(GPU_PY) tools/gpu_check.py --device $(DEVICE)
endif

lint: setup
	$(VENV)/bin/ruff check megafork tests bench tools examples contract

clean:
	rm -rf build *.egg-info megafork/*.so runs $(SGL_DIR)
