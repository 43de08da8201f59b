# Front door. Each target creates or updates .venv/ when needed.
.PHONY: test venv bench

venv:
	bash scripts/ensure_venv.sh

test:
	bash scripts/run_tests.sh $(ARGS)

bench: venv
	.venv/bin/python benchmarks/tokenizer_throughput.py
