# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

# -qq keeps pip to errors: this machine's pip config names local wheel folders that do not all exist.
$(INSTALLED): pyproject.toml
	@echo "installing into $(VENV) (about 3 minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# These two builds lie on the machine's own disk; any other version downloads gigabytes.
	$(PY) -m pip install -qq torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -qq -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/effsearch demo

# pytest exits 5 when it collected no test: that means the suite is missing, which is a failure here.
test: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(PY) -m pytest --timeout=900 -ra --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .effsearch .pytest_cache
