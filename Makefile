# kvmesh — the two commands: `make up` and `make test` (each installs first).
.PHONY: install up test unit proto lint

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
