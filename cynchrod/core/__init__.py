"""The pure core: specs, the planner, the decision core and the error codes. No I/O, directly or not
(import-linter's pure-core contract)."""
