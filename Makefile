# edgekit: `make run` builds a bundle for this machine and generates from it; `make test` runs the tests.
# Both set up what they need first (a virtualenv with pinned CPU torch).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `make run` builds: a Hugging Face id as a user would have it, or a local checkpoint folder.
# Without hub access it falls back to the random-weight 0.8B fixture, and says so.
MODEL ?= Qwen/Qwen3.5-0.8B
PROFILE ?= host
PROMPT ?= Explain in two sentences what an edge device is.
# Random-weight fixtures cannot meet real-model quality thresholds: use the loose gate for them.
RANDOM := $(if $(findstring fixtures/,$(MODEL)),--random-weights,)
# torch from the CPU build: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install system-deps run test test-fast bench bench-anchor bench-fleet bench-vision quality fixtures lint clean

$(BIN)/edgekit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The x86-64 custom op's library (edgekit/kernels/): pip's install builds it; this rebuilds it when its source changes.
edgekit/kernels/libedgekit_int4.so: edgekit/kernels/int4_layout.c | $(BIN)/edgekit
	$(BIN)/python -m edgekit.kernels.build

install: $(BIN)/edgekit edgekit/kernels/libedgekit_int4.so

fixtures/qwen3.5-tiny/config.json: | install
	$(BIN)/python -m edgekit.fixtures tiny fixtures/qwen3.5-tiny
fixtures/qwen3.5-0.8b/config.json: | install
	$(BIN)/python -m edgekit.fixtures 0.8b fixtures/qwen3.5-0.8b
fixtures/qwen3.5-2b/config.json: | install
	$(BIN)/python -m edgekit.fixtures 2b fixtures/qwen3.5-2b

# The quality fixture: trained here on CPython's standard library tests (about ten minutes on 2 cores), again
# whenever its recipe (edgekit/fixtures/trained.py) changes.
fixtures/qwen3.5-trained/config.json: edgekit/fixtures/trained.py | install
	$(BIN)/python -m edgekit.fixtures trained fixtures/qwen3.5-trained

fixtures: fixtures/qwen3.5-tiny/config.json fixtures/qwen3.5-0.8b/config.json fixtures/qwen3.5-trained/config.json

run: install
	$(BIN)/python -m edgekit.demo --model "$(MODEL)" --profile $(PROFILE) --prompt "$(PROMPT)" $(RANDOM)

# The tests start their own Mosquitto brokers and sshd (the deploy tests' device), validate
# cloud-init user-data, run the Ansible playbook and emulate a Raspberry Pi (an arm64 Debian root
# filesystem under qemu-user): install what is missing (Debian packages).
SYSTEM_PACKAGES := mosquitto openssh-server openssh-client sudo ansible cloud-init python3-venv \
	qemu-user-static binfmt-support mmdebstrap
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The full suite (CI's): needs root, as it creates users, mounts a tmpfs and runs sshd.
test: install system-deps fixtures/qwen3.5-trained/config.json
	$(BIN)/python -m pytest -q

# The fast tier: everything not marked slow (no SSH deploys, no extra bundle builds).
test-fast: install system-deps
	$(BIN)/python -m pytest -q -m "not slow"

# Build benchmarks on the full-size 0.8B and 2B fixtures, then the serve benchmark on the 0.8B
# bundle (4096-token context, threads = this machine's cores, decode after 0, 1,024 and 4,032 tokens).
bench: install fixtures/qwen3.5-0.8b/config.json fixtures/qwen3.5-2b/config.json
	$(BIN)/python bench/build_bench.py --out bench-results
	$(BIN)/edgekit build --profile raspberry-pi-5 --model fixtures/qwen3.5-0.8b --output bench-results \
		--name bench-0.8b --overwrite --min-top1 0 --max-kl 1.0
	$(BIN)/edgekit bench bench-results/bench-0.8b --threads $$(nproc) --runs 5 --depths 0,1024,4032 --json > bench-results/serve.json
	cat bench-results/serve.json
	@# x86-64: edgekit's Int4Layout op against MatMulNBits, one pass over the 0.8B's matmuls (docs/platform-facts.md).
	if [ "$$(uname -m)" = x86_64 ]; then $(BIN)/python bench/int4_layout.py --size 0.8b --rounds 3 --threads $$(nproc) \
		> bench-results/int4_layout.json && cat bench-results/int4_layout.json; fi

# edgekit against llama.cpp on the same weights (docs/benchmarks.md): alternating rounds at 1 and 2
# threads, prefill and decode after 0/1k/4k tokens of context, with bandwidth probes that tell quiet
# rounds from contended ones. Builds llama.cpp once (as `make quality` does); an hour or more.
bench-anchor: install fixtures/qwen3.5-0.8b/config.json fixtures/qwen3.5-2b/config.json
	$(BIN)/python bench/anchor.py --out anchor-results

# A simulated fleet (docs/fleet.md): up to twenty tiny-model daemons in one pool behind one Mosquitto and
# one gateway, on this machine: throughput, fairness, broker and gateway CPU per member count (minutes).
# What images cost on the 0.8B and 2B (docs/vision.md): encoder time per size, time to first token, RSS.
bench-vision: install fixtures/qwen3.5-0.8b/config.json fixtures/qwen3.5-2b/config.json
	for size in 0.8b 2b; do \
		$(BIN)/edgekit build --profile raspberry-pi-5 --model fixtures/qwen3.5-$$size --output vision-results \
			--name vision-$$size --overwrite --min-top1 0 --max-kl 10 || exit 1; \
		$(BIN)/python bench/vision.py vision-results/vision-$$size --runs 3 --out vision-results || exit 1; \
	done

# The daemon's memory on emulated Raspberry Pis beside this host's (docs/arm64.md): the 0.8B's plain and
# --include-mtp raspberry-pi-5 bundles on a Pi 5 (Cortex-A76), the raspberry-pi-4 bundle on a Pi 4
# (Cortex-A72). Sizes only: nothing timed under emulation. Root (the arm64 lane's mounts); about an hour.
bench-device-memory: install system-deps fixtures/qwen3.5-0.8b/config.json
	$(BIN)/edgekit build --profile raspberry-pi-5 --model fixtures/qwen3.5-0.8b --output memory-results \
		--name pi5-0.8b --overwrite --text-only --min-top1 0 --max-kl 10
	$(BIN)/edgekit build --profile raspberry-pi-5 --model fixtures/qwen3.5-0.8b --output memory-results \
		--name pi5-mtp-0.8b --overwrite --text-only --include-mtp --min-top1 0 --max-kl 10
	$(BIN)/edgekit build --profile raspberry-pi-4 --model fixtures/qwen3.5-0.8b --output memory-results \
		--name pi4-0.8b --overwrite --text-only --min-top1 0 --max-kl 10
	$(BIN)/python bench/device_memory.py memory-results/pi5-0.8b --cpu cortex-a76 --out memory-results/pi5.json
	$(BIN)/python bench/device_memory.py memory-results/pi5-mtp-0.8b --cpu cortex-a76 --out memory-results/pi5-mtp.json
	$(BIN)/python bench/device_memory.py memory-results/pi4-0.8b --cpu cortex-a72 --out memory-results/pi4.json

bench-fleet: install fixtures/qwen3.5-tiny/config.json
	$(BIN)/edgekit build --profile host --model fixtures/qwen3.5-tiny --output fleet-results --name fleet-tiny \
		--overwrite --min-top1 0 --max-kl 10
	$(BIN)/python bench/fleet.py fleet-results/fleet-tiny --members 1,2,5,10,20 --out fleet-results

# The quality table (docs/quality.md): every recipe the profiles offer, built from the trained fixture,
# beside llama.cpp's Q4_0, Q4_K_M and Q2_K of it on the same held-out text. Downloads llama-cpp-python's
# sdist and builds its llama.cpp once (cached in ~/.cache/edgekit); not part of `make test`.
quality: install fixtures/qwen3.5-trained/config.json
	$(BIN)/python bench/quality_table.py --model fixtures/qwen3.5-trained --out quality-results

# Style and types: ruff over the tree, mypy as pyproject.toml sets it (strict on the contract modules).
lint: install
	$(BIN)/ruff check edgekit tests bench examples
	$(BIN)/mypy

clean:
	rm -rf dist bench-results quality-results anchor-results mtp-results vision-results .pytest_cache
