# Two commands on a fresh Debian machine:
#   make run    create .venv, install, start the node with config.yaml
#   make test   create .venv, install, install Debian peers (as root), run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBIAN_PACKAGES := orthanc dcmtk dicom3tools chromium fonts-dejavu-core openssl

.PHONY: run test venv system-deps check bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build; nothing later may pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Orthanc (the PACS), dcmtk (other nodes) and dicom3tools (dciodvfy) are test peers;
# chromium (headless) and a font screenshot the status page; openssl makes the throwaway
# certificates of the TLS tests.
system-deps:
	@missing=""; \
	for pair in Orthanc:orthanc storescu:dcmtk dciodvfy:dicom3tools chromium:chromium openssl:openssl; do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; \
	done; \
	[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$$missing fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (not root: their tests will be skipped)"; \
	  fi; \
	fi

check: venv
	$(BIN)/ruff check node pipeline sr_writer tests bench
	$(BIN)/mypy node pipeline sr_writer

test: venv system-deps check
	$(BIN)/python -m pytest

run: venv
	$(BIN)/ich-node run --config config.yaml

bench: venv system-deps
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) spool .pytest_cache .mypy_cache .ruff_cache
