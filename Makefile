# The two entry points; both install what is missing first (see .ci/env.sh).
.PHONY: quickstart test
quickstart:
	.ci/quickstart
test:
	.ci/test
