# `make test` builds .venv from the pinned requirements (torch comes from the wheels on this machine's disk),
# extracts Transformers' common test mixins from the pinned transformers sdist (PyPI), runs `make lint` (ruff) and
# the whole test suite. `make demo` trains, evaluates and saves a model on the embedded dataset. `make bench` runs
# the benchmarks. `make demo DEMO_ARGS="--mixed_precision no"` runs the demo in fp32 on any CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser lint test demo bench freeze clean

$(STAMP): requirements/dev.txt requirements/constraints.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.0"
	$(PY) -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) tests/transformers_common/fetch.py
	touch $(STAMP)

install: $(STAMP) browser

# Debian's chromium + chromium-driver for the search page's browser test (tests/test_serve.py), when missing
browser:
	@.ci/install-browser

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint browser
	HF_CLIP_REQUIRE_COMMON_TESTS=1 $(PY) -m pytest -n 2 --dist worksteal tests

demo: $(STAMP)
	$(PY) -m hf_clip_train.train --output_dir outputs/demo --patch_size 16 --max_steps 500 $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_text_padding.py
	$(PY) benchmarks/bench_export.py  # its int8 agreement uses outputs/demo: run `make demo` first
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_host_sync.py
	$(PY) benchmarks/bench_towers.py  # ViT-B/16 + BERT-base train steps on the CPU
	$(PY) benchmarks/bench_loss.py --cases infonce-4096 infonce-16384 sigmoid-16384  # add infonce-65536: 24 min here, under load

freeze: $(STAMP)
	{ echo "# Full, exact dev/CI environment (pip freeze of requirements/dev.txt). Regenerate with 'make freeze'."; \
	  $(PY) -m pip freeze --exclude-editable; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
