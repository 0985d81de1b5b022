//! The layers hold: the core never depends on the HTTP stack (or on the API crate), the
//! API never on the binary's crate, and nothing but the trainer links libtorch. Read from
//! `cargo metadata`, so a new dependency that breaks a layer fails here.

use cargo_metadata::{MetadataCommand, Package, PackageId};
use std::collections::{BTreeSet, HashMap};

/// Every package `root` depends on at build or run time (not dev-dependencies), transitively.
fn dependencies(name: &str) -> BTreeSet<String> {
    let metadata = MetadataCommand::new()
        .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
        .exec()
        .expect("cargo metadata");
    let resolve = metadata.resolve.as_ref().expect("a resolved graph");
    let packages: HashMap<&PackageId, &Package> =
        metadata.packages.iter().map(|p| (&p.id, p)).collect();
    let nodes: HashMap<&PackageId, _> = resolve.nodes.iter().map(|n| (&n.id, n)).collect();
    let root = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == name)
        .unwrap_or_else(|| panic!("no package {name}"));
    let mut seen = BTreeSet::new();
    let mut stack = vec![&root.id];
    while let Some(id) = stack.pop() {
        for dep in &nodes[id].deps {
            let normal = dep
                .dep_kinds
                .iter()
                .any(|k| k.kind != cargo_metadata::DependencyKind::Development);
            if normal && seen.insert(packages[&dep.pkg].name.to_string()) {
                stack.push(&dep.pkg);
            }
        }
    }
    seen
}

#[test]
fn the_core_knows_no_http_framework() {
    let deps = dependencies("loraforge-core");
    // (tower-http may come in through reqwest, the webhook client; the server side may not.)
    for forbidden in [
        "axum",
        "axum-core",
        "utoipa-axum",
        "loraforge-api",
        "loraforge",
    ] {
        assert!(
            !deps.contains(forbidden),
            "loraforge-core depends on {forbidden}"
        );
    }
    assert!(deps.contains("sqlx"), "the check reads the real graph");
}

#[test]
fn the_api_does_not_reach_up_and_nothing_but_the_trainer_links_libtorch() {
    let api = dependencies("loraforge-api");
    assert!(
        !api.contains("loraforge"),
        "loraforge-api depends on the binary's crate"
    );
    for control_plane in ["loraforge", "loraforge-api", "loraforge-core"] {
        assert!(
            !dependencies(control_plane).contains("tch"),
            "{control_plane} links libtorch"
        );
    }
}

#[test]
fn the_cli_is_a_client_of_the_http_api_only() {
    // (Read from the workspace's resolve, where features are unified: loraforge-spec's
    // optional sqlx, which the core turns on, shows up here; the CLI's own build has none.)
    let cli = dependencies("loraforge-cli");
    for forbidden in [
        "loraforge-core",
        "loraforge-api",
        "loraforge",
        "axum",
        "tch",
    ] {
        assert!(
            !cli.contains(forbidden),
            "loraforge-cli depends on {forbidden}"
        );
    }
    assert!(cli.contains("reqwest"), "the check reads the real graph");
}
