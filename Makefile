# Two entry points: `make demo` and `make test`. Both create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out
# torch / torchvision pinned to the releases this project is verified with.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test accuracy clean

$(BIN)/ctmask: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/ctmask

# Synthetic data -> segmentation model -> classifier -> evaluation, `small` preset: the
# accuracy recipe of scripts/accuracy.sh on a smaller set with shorter training.
demo: install
	$(BIN)/ctmask synth $(DEMO)/data --slices 360 --seed 0 -q > /dev/null
	$(BIN)/ctmask train-seg $(DEMO)/data/segmentation/train --preset small --out $(DEMO)/seg.pt \
		--epochs 5 --batch-size 4 --lr 5e-4 --weight-decay 1e-4 --json $(DEMO)/train-seg.json
	$(BIN)/ctmask evaluate $(DEMO)/seg.pt --seg-dir $(DEMO)/data/segmentation/test --json $(DEMO)/eval-seg.json -q
	$(BIN)/ctmask train-cls $(DEMO)/seg.pt --preset small --variant heads \
		--train-split $(DEMO)/data/train_COVIDx_CT.txt --val-split $(DEMO)/data/val_COVIDx_CT.txt \
		--out $(DEMO)/cls-heads.pt --epochs 60 --batch-size 8 --lr 1e-4 -q
	$(BIN)/ctmask train-cls $(DEMO)/cls-heads.pt --preset small --variant heads+bn \
		--train-split $(DEMO)/data/train_COVIDx_CT.txt --val-split $(DEMO)/data/val_COVIDx_CT.txt \
		--out $(DEMO)/cls.pt --epochs 1 --batch-size 8 --lr 1e-4 --json $(DEMO)/train-cls.json
	$(BIN)/ctmask evaluate $(DEMO)/cls.pt --split $(DEMO)/data/test_COVIDx_CT.txt --json $(DEMO)/eval-cls.json -q
	@$(BIN)/python -c "import json; c = json.load(open('$(DEMO)/data/synth.json'))['splits']; \
		print('demo: small preset trained on', c['train']['n'], 'SYNTHETIC training slices (' + \
		', '.join(f'{k} {v}' for k, v in c['train']['classes'].items()) + '), evaluated on', \
		c['test']['n'], 'test slices; reports in $(DEMO)/')"

# The full accuracy run (2,500 synthetic slices; about 30 minutes on 2 cores).
accuracy: install
	scripts/accuracy.sh runs/accuracy

test: install
	$(BIN)/ruff check ctmask tests
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
