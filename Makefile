# Front door. Each target creates or updates .venv/ when needed.
.PHONY: test test-fast venv bench demo

venv:
	bash scripts/ensure_venv.sh

test:
	bash scripts/run_tests.sh $(ARGS)

# the unit tier: everything but multi-process launches, end-to-end runs and the demo
test-fast:
	bash scripts/run_tests.sh -m "not slow" $(ARGS)

demo: venv
	PATH="$(CURDIR)/.venv/bin:$$PATH" bash launch/demo.sh --out runs/demo $(ARGS)

bench: venv
	.venv/bin/python benchmarks/tokenizer_throughput.py
