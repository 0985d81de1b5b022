# The two entry points; both install what is missing first (see .ci/env.sh).
.PHONY: quickstart test bench-registry sqlx-prepare
quickstart:
	.ci/quickstart
test:
	.ci/test
# After changing a query or a migration: regenerate .sqlx/ (the offline query data) and commit it.
sqlx-prepare:
	.ci/sqlx-prepare
# Registry read-path load benchmark (release build; results go in bench/registry.md).
bench-registry:
	bash -c 'source .ci/env.sh && cargo bench -p loraforge-e2e --bench registry_load'
