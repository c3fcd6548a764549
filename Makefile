# The two commands of the README: `make demo` runs the system, `make test` runs every check. Both install what they
# need first (tools/bootstrap.sh: apt-get where missing, a venv, the package with its C extension).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edge-installed
NATIVE := $(wildcard native/*.c native/*.h)

.PHONY: all test demo lint typecheck unit test-arm64 test-system check-yocto bench clean

all: test

$(STAMP): pyproject.toml setup.py $(NATIVE) tools/bootstrap.sh
	./tools/bootstrap.sh
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check edge tests tools
	$(PY) -m ruff format --check edge tests tools

typecheck: $(STAMP)
	$(PY) -m mypy

# EDGE_REQUIRE_NATIVE makes a missing or broken extension an error instead of a fallback to the numpy twin.
unit: $(STAMP)
	EDGE_REQUIRE_NATIVE=1 $(PY) -m pytest -q

# The tiers run two at a time: the unit tests and the system tier mostly wait (on brokers and subprocesses, on the
# guest), so side by side they take about the longer one's time. The unit tests hold timing-sensitive checks (the
# GIL released, throughput under faults), so the other tiers run at the lowest CPU priority (TIER_NICE) and take
# what the unit tests leave. --output-sync keeps each tier's output in one block, printed when it ends.
test: lint typecheck
	$(MAKE) --no-print-directory -j2 --output-sync=target test-system unit check-yocto test-arm64 \
		TIER_NICE="nice -n 19"

# The emulated aarch64 tier (docs/arm64.md): the subset in tools/qemu/tests.txt under qemu-user on a Cortex-A72,
# against the NEON build of the extension; its work (sysroot, wheels, build) is cached in .cache/arm64/.
test-arm64: $(STAMP)
	$(TIER_NICE) ./tools/qemu/arm64.sh

# The box as a system (docs/system.md): an arm64 Debian image with the box's Debian package installed, booted under
# qemu-system-aarch64: systemd READY, watchdog and kill -9 restarts; enrollment with a claim code and telemetry to a
# fleet on the host; power cuts at random moments (EDGE_SYSTEM_POWER_CUTS, default 3) and an update across one; a
# camera (the kernel's vivid) loaded after the service started, unplugged and back.
# The image is cached in .cache/system/.
test-system: $(STAMP)
	$(TIER_NICE) $(PY) -m pytest -q -p no:cacheprovider tests/system

# Offline checks of the Yocto layer (yocto/meta-edge/README.md): oelint-adv, the recipe against the project, the
# kickstart on wrynose's search path, the PyPI recipes built with wrynose's tool versions, kas files against kas's
# schema and pinned, the fleet package in no image, and the wheel built without isolation (caches in .cache/yocto/).
check-yocto: $(STAMP)
	$(TIER_NICE) $(PY) tools/yocto/check.py

demo: $(STAMP)
	EDGE_REQUIRE_NATIVE=1 $(PY) tools/demo.py

bench: $(STAMP)
	$(PY) tools/bench/preprocess.py
	$(PY) tools/bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info edge/_native*.so
