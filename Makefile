# dfk8s: `make install` sets everything up on a fresh Linux machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
# torch first, from the exact version whose CPU wheel is available offline; any other request pulls CUDA.
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0

.PHONY: install test lint bench images test-images kind-up kind-down kind-test clean help \
	cluster-build cluster-images cluster-up cluster-down test-cluster

help:  ## List targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

LITELLM_VERSION ?= 1.81.13

install: $(PY)  ## Create .venv with dfk8s and every extra (torch CPU first), Debian's chromium and shellcheck, and LiteLLM.
	hack/install-debian-packages.sh
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(PY) -m pip install -q -e '.[api,gpu,vlm,kube,models,test]'
	# The gateway the tests put before the fake API, in a venv of its own: its pins would move ours.
	test -x .venv-litellm/bin/litellm || { $(PYTHON) -m venv .venv-litellm && \
	  .venv-litellm/bin/python -m pip install -q 'litellm[proxy]==$(LITELLM_VERSION)'; }

test:  ## Run the test suite.
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# ---- The local cluster (hack/cluster, tests/cluster) -----------------------------------------------
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet, kubectl, helm, the CNI
# plugins and the fake GPU device plugin built from their Go modules into ~/.cache/dfk8s/cluster
# (DFK8S_CLUSTER_CACHE), one folder per version: minutes once, then seconds. containerd and runc are
# Debian's. The node runs the images of this checkout (cluster-images). KUBE_VERSION=1.33 picks the
# version of cluster-up (default: the newest pinned).
KUBE_VERSIONS := $(shell cat hack/cluster/kube-*/VERSION)
CLUSTER_DIR ?= .cluster

cluster-build:  ## Build the control plane, kubectl and helm from their Go modules (cached by version).
	hack/cluster/build.sh

cluster-images:  ## Build dfk8s-cpu:dev and dfk8s-gpu:dev from this checkout and save them for the node (cold ~10 min).
	hack/cluster/images.sh

cluster-up: cluster-build cluster-images  ## Start the cluster (control plane, node, S3) in its own namespaces, in the background (.cluster/env).
	$(PY) -m tests.cluster.controlplane up --dir $(CLUSTER_DIR) $(if $(KUBE_VERSION),--version $(KUBE_VERSION))

cluster-down:  ## Stop what cluster-up started; nothing of it is left.
	$(PY) -m tests.cluster.controlplane down --dir $(CLUSTER_DIR)

test-cluster: cluster-build cluster-images  ## The cluster tests (tests/cluster), once per pinned Kubernetes version.
	@for v in $(KUBE_VERSIONS); do \
	  echo "--> tests/cluster against Kubernetes $$v"; \
	  DFK8S_CLUSTER_TESTS=1 DFK8S_KUBE_VERSION=$$v $(PY) -m pytest -q -p no:xdist -p no:cacheprovider \
	    --durations=5 tests/cluster $(PYTEST_ARGS) || exit 1; \
	done

lint:  ## ruff over the package, tests and benchmarks.
	$(BIN)/ruff check dfk8s tests bench

bench:  ## Run the CPU benchmarks and print their ratios (see bench/RESULTS.md).
	$(PY) bench/caption_api.py
	$(PY) bench/worker_overhead.py
	$(PY) bench/plan_reduce.py
	$(PY) bench/report.py

clean:  ## Remove build and test leftovers (not .venv).
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs

# ---- Images and clusters (Docker; see images/ and hack/) -----------------------------------------
# Bases to build FROM; empty: the Dockerfiles' defaults (python:3.12-slim-bookworm, nvidia/cuda).
CPU_BASE_IMAGE ?=
GPU_BASE_IMAGE ?=

.PHONY: image-cpu image-gpu docker-up docker-down

images: image-cpu image-gpu  ## Build the CPU and GPU images (dfk8s-cpu:dev, dfk8s-gpu:dev) with your Docker.

image-cpu:  ## Build dfk8s-cpu:dev (launcher, reducer, API workers, SeaweedFS); CPU_BASE_IMAGE=... to change the base.
	BASE_IMAGE=$(CPU_BASE_IMAGE) hack/build-image.sh cpu

image-gpu:  ## Build dfk8s-gpu:dev (FLUX workers, CUDA torch: several GB); GPU_BASE_IMAGE=... to change the base.
	BASE_IMAGE=$(GPU_BASE_IMAGE) hack/build-image.sh gpu

docker-up:  ## Start a private dockerd (no bridge/iptables) at unix:///tmp/dfk8s-docker/docker.sock.
	hack/docker-up.sh

docker-down:  ## Stop the private dockerd (its image cache stays in /tmp/dfk8s-docker).
	hack/docker-down.sh

test-images:  ## Private dockerd + debootstrap base + CPU image, then tests/images (worker/reducer containers on S3).
	PYTHON=$(abspath $(PY)) hack/test-images.sh

kind-up:  ## Create the kind cluster dfk8s-test, load the CPU image, install the chart with S3 and fake API.
	hack/kind-test.sh up

kind-down:  ## Delete the kind cluster dfk8s-test.
	hack/kind-test.sh down

kind-test:  ## On a machine with kind, helm, kubectl, docker: submit the caption fixture to kind, check result.jsonl.
	DFK8S=$(abspath $(BIN))/dfk8s PYTHON=$(abspath $(PY)) hack/kind-test.sh test
