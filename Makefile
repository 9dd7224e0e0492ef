# pacsportal: `make run` starts the product, `make test` runs the tests (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: run test setup setup-dev migrate bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/activate
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

migrate: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0

run: migrate
	@echo ""
	@echo "pacsportal is starting:"
	@echo "  web portal   http://localhost:$${PACS_HTTP_PORT:-8000}/   (admin: http://localhost:$${PACS_HTTP_PORT:-8000}/admin/)"
	@echo "  DICOM SCP    AE title $${PACS_AE_TITLE:-PACSPORTAL}, port $${PACS_DICOM_PORT:-11112}"
	@echo "  first admin: $(PY) manage.py createsuperuser"
	@echo "  stop: Ctrl-C"
	@echo ""
	PATH="$(abspath $(BIN)):$$PATH" PYTHONUNBUFFERED=1 $(BIN)/honcho -f Procfile start 2>&1 || true

test: setup-dev
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(BIN)/pytest

bench: setup-dev
	$(PY) bench/ingest.py --db both
	$(PY) bench/query.py --db both
	$(PY) bench/association.py --db sqlite
	$(PY) bench/move.py --db both
	$(PY) bench/viewer.py --db both
	$(PY) bench/audit.py --db both
	$(PY) bench/dicomweb.py --db postgres

clean:
	rm -rf $(VENV)
