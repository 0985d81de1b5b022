//! End-to-end tests live in `tests/*.rs`; see `common/mod.rs` for the harness.
