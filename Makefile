# The two entry points; both install what is missing first (see .ci/env.sh).
.PHONY: quickstart test bench-registry
quickstart:
	.ci/quickstart
test:
	.ci/test
# Registry read-path load benchmark (release build; results go in bench/registry.md).
bench-registry:
	bash -c 'source .ci/env.sh && cargo bench -p loraforge-e2e --bench registry_load'
