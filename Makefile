# Two commands a new user needs: `make demo` and `make test`. Both create the
# virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint fashion-mnist clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(INSTALLED)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
fashion-mnist:
	@if [ ! -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
			apt-get update && apt-get install -y dataset-fashion-mnist; \
		else \
			echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR)."; \
			echo "Install it with: sudo apt-get install dataset-fashion-mnist"; \
			echo "or point FASHION_MNIST_DIR at a folder holding the four IDX .gz files."; \
			exit 1; \
		fi; \
	fi

demo: install fashion-mnist
	$(VENV)/bin/maskedkd demo --source $(FASHION_MNIST_DIR) --out $(DEMO_OUT)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy teacher_service student_trainer pipelines

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
