PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/
# On the project machines these two versions install from local disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m lightning_sa_unlearn.demo --data $(DATA)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info lightning_logs
