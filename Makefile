# Two entry points, each creating what it needs (a virtual environment in .venv).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-distro test-arch test-systemd test-cdi bench-fairness clean
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[broker,test]'
	# cudart 12 for tests/test_native_runtime.py, outside site-packages (nothing else may
	# find its headers); NVIDIA ships it for x86-64 and aarch64 only
	case "$$(uname -m)" in x86_64|aarch64) $(VENV)/bin/pip install --quiet --no-deps \
	    --target $(VENV)/cudart12 'nvidia-cuda-runtime-cu12==12.9.*';; esac
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Kernels compiled by another distribution's g++ against its glibc, run for real (sandbox
# included): a Debian 13 rootfs (g++ 14, glibc 2.41, Python 3.13), amd64, natively. The
# CPU-backend tests: the compiler and its headers, PTX (NVRTC's and hand-written), fatbins,
# the sandbox and the executor's confinement, scheduling, end to end through a real broker.
# tools/rootfs.sh makes the rootfs (root, mmdebstrap; cached in ~/.cache/kubecash-rootfs).
DISTRO_TESTS := tests/test_cpukernels.py tests/test_ptx.py tests/test_ptx_corpus.py tests/test_ptx_half.py \
	tests/test_fatbin.py tests/test_sandbox.py tests/test_confinement.py tests/test_scheduling.py \
	tests/test_scheduler_logic.py tests/test_end_to_end.py
test-distro:
	tools/rootfs.sh amd64 trixie test $(DISTRO_TESTS)

# The CPU backend on arm64 and riscv64, under qemu-user in Debian 13 rootfs (binfmt_misc):
# kernels and scheduling. qemu-user has no seccomp: sandbox tests skip there (x86-64 runs
# them); riscv64 has no NVRTC: tests of CUDA C source skip there, PTX tests run.
ARCH_TESTS := tests/test_cpukernels.py tests/test_scheduling.py tests/test_scheduler_logic.py tests/test_end_to_end.py
ARCHES := arm64 riscv64
test-arch:
	@rc=0; for a in $(ARCHES); do tools/rootfs.sh $$a trixie test $(ARCH_TESTS) || rc=1; done; exit $$rc

# The systemd unit under a real systemd, booted in podman from the Debian 13 rootfs (with
# systemd and this tree installed): READY, reload, the watchdog, restart after kill -9, tenant
# directories across a stop (tests/test_systemd.py; root and podman).
test-systemd: $(STAMP)
	tools/rootfs.sh amd64 trixie install
	KUBECASH_SYSTEMD_ROOTFS=$$(tools/rootfs.sh amd64 trixie path) $(VENV)/bin/python -m pytest -q -rs tests/test_systemd.py

# A container given only --device kubecash.io/tenant=<name> (podman, the same rootfs): it runs
# an nvcc-built program within its tenant and reaches nothing else (tests/test_container.py).
test-cdi: $(STAMP)
	tools/rootfs.sh amd64 trixie check >/dev/null
	KUBECASH_CONTAINER_ROOTFS=$$(tools/rootfs.sh amd64 trixie path) $(VENV)/bin/python -m pytest -q -rs tests/test_container.py

bench-fairness: $(STAMP)
	$(VENV)/bin/python bench/fairness.py

clean:
	rm -rf $(VENV) build *.egg-info
