# The two commands of the README, and a few more for developers.
#   make demo   compress the bundled DeiT-tiny on real ImageNet images and evaluate it
#   make test   run the test suite (what CI runs)
# Both install the system LAPACK (libopenblas-dev) first if it is missing, and both run OpenBLAS's
# kernels for this processor where the library is older than it (scripts/with-blas.sh).

DATA ?= ../shared/data
OUT ?= out/deit-tiny
CARGO ?= cargo
FIPS = $(CARGO) run --release --quiet --features cli --bin fips --

.PHONY: demo demo-llm test lapack check layers lean bench sweep

lapack:
	@sh scripts/ensure-lapack.sh

# One BLAS thread: DeiT-tiny's training GEMMs are small, so the blocks of a group train in
# parallel, one core each (docs/results.md, "Blocks in parallel").
demo: lapack
	OPENBLAS_NUM_THREADS=1 $(FIPS) compress --checkpoint $(DATA)/deit-tiny/model.safetensors \
		--images $(DATA)/imagenet-sample --out-dir $(OUT)

# The language-model demo: stories260k (a 5-block Llama) compressed at p = 0.5 and p = 0.75
# (s = 0.75, all blocks one group), calibrated on calib.txt (5 % of its paragraphs held out),
# dense and compressed perplexity on eval.txt. The model is 64 wide: one BLAS thread is fastest.
LLM ?= $(DATA)/stories260k
LLM_OUT ?= out/stories260k
FIPS_TEXT = OPENBLAS_NUM_THREADS=1 $(CARGO) run --release --quiet --features cli,text --bin fips --
demo-llm: lapack
	for p in 0.5 0.75; do \
		$(FIPS_TEXT) compress --model $(LLM) --text $(LLM)/calib.txt --eval-text $(LLM)/eval.txt \
			--groups 0-4 --budget $$p --sparsity 0.75 --threads 1 --out-dir $(LLM_OUT)-p$$p \
			|| exit 1; \
	done

# `with-blas.sh`: OpenBLAS's kernels for this processor also where the library does not know it
# (the `fips` command checks that itself).
test: lapack
	FIPS_DATA_DIR=$(DATA) sh scripts/with-blas.sh $(CARGO) test --features cli,text

# Formatting, lints, docs, the layering and the lean library, as reviewers (and CI) run them.
check: lapack
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features cli,text -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --features cli,text
	$(MAKE) layers lean

# No module imports from a higher room, no import loop (docs/design.md §0).
layers:
	$(CARGO) test --features cli,text --test layers

# The library without optional features compiles no application code.
lean:
	CARGO=$(CARGO) sh scripts/check-lean.sh

# Criterion benchmarks of the training step, the initialisation and a plain sgemm.
bench: lapack
	sh scripts/with-blas.sh $(CARGO) bench --bench step
