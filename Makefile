# kvmesh — the two commands: `make up` and `make test` (each installs first).
.PHONY: install up test unit proto lint images images-here

ARGS ?=

install:
	bash scripts/install.sh

up: install
	.venv/bin/kvmesh up $(ARGS)

test: install
	bash scripts/test.sh $(ARGS)

unit: install
	bash scripts/test.sh -m unit $(ARGS)

proto:
	.venv/bin/python protos/generate.py

lint:
	.venv/bin/ruff check .

DOCKER ?= docker
images:
	$(DOCKER) build -f deploy/docker/wheel.Dockerfile -t kvmesh/wheel:0.1.0 .
	for s in router gateway edge worker-cpu worker-cuda; do \
	  $(DOCKER) build -f deploy/docker/$$s.Dockerfile -t kvmesh/$$s:0.1.0 . || exit 1; done

# No daemon, no registry: buildah from a debootstrap-made Debian python base (scripts/images.sh).
images-here:
	bash scripts/images.sh router edge gateway worker-cpu
