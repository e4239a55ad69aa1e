# Two entry points: `make demo` and `make test`. Both create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out
# torch / torchvision pinned to the releases this project is verified with.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
TRT_STUBS := tensorrt-stubs==10.13.0.35.1

.PHONY: install demo test accuracy docs clean

# `pip install ctmask` alone is the torch-free runtime; the train extra adds torch & co, dev adds
# the test tools, qat NVIDIA ModelOpt (ctmask qat and tests/test_qat.py).
# tensorrt-stubs (mypy's view of TensorRT) requires the real tensorrt wheel in its
# metadata, which cannot be installed without a GPU: hence --no-deps, on its own line.
$(BIN)/ctmask: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[train,dev,qat]'
	$(BIN)/pip install -q --no-deps $(TRT_STUBS)
	touch $@

install: $(BIN)/ctmask

# Synthetic data -> segmentation model -> classifier -> evaluation, `small` preset: the
# accuracy recipe on a smaller set (360 slices) with shorter training; then export to
# ONNX, torch-free inference on the held-out slices, parity against PyTorch, benchmark.
demo: install
	scripts/train_eval.sh $(DEMO) 360 5 60
	scripts/deploy.sh $(DEMO)

# The full accuracy run (2,500 synthetic slices; about 25 minutes of training on 2 idle
# cores). SEED seeds all training (same seed, same machine: identical checkpoints).
SEED ?= 0
accuracy: install
	scripts/train_eval.sh runs/accuracy 2500 6 100 $(SEED)

# Debian packages that some tests use; each of those tests skips, saying why, where its package is
# missing. chromium: tests/test_report.py opens the HTML report in headless Chromium. orthanc and
# orthanc-dicomweb: tests/test_pacs.py runs a real PACS (started by the tests on free loopback ports;
# the package's own service is not used). dicom3tools: dciodvfy, the DICOM validator
# tests/test_dicom_out.py runs on every object `infer --dicom-out` writes. `make test` installs the
# missing ones in one apt-get run, where apt-get is available and we are root.
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
.PHONY: test-packages chromium orthanc dicom3tools
test-packages:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	{ command -v Orthanc >/dev/null && [ -e $(ORTHANC_DICOMWEB) ]; } || missing="$$missing orthanc orthanc-dicomweb"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	[ -z "$$missing" ] || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
	  echo "warning: could not install$$missing (needs apt-get and root): the tests that use them will skip"
chromium orthanc dicom3tools: test-packages
test: test-packages

# pytest-xdist workers: one per core (at most 4: each test module's fixtures are made per worker).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: install
	$(BIN)/ruff check ctmask tests
	$(BIN)/python scripts/trt_stubs.py build/trt-stubs
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The documentation site (MkDocs, Material theme) from docs/ into build/site; --strict: a broken
# link, a missing page or a docstring the API reference cannot render is an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

clean:
	rm -rf $(DEMO) .pytest_cache build/trt-stubs build/site
