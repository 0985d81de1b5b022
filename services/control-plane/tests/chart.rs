//! The Helm chart and the code must agree: the chart ships the CRD `loraforge crd` prints,
//! its Role grants exactly the rules the code lists (`operator::rbac::RULES`), and the CRD's
//! spec schema has every field of the REST API's JobSpec (the OpenAPI snapshot) and no other.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_chart_ships_the_generated_crd() {
    let path = repo().join("helm/loraforge/crds/lorajobs.loraforge.dev.yaml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert!(
        shipped == loraforge::crd::yaml(),
        "{} is stale: run `loraforge crd > {}`",
        path.display(),
        path.display()
    );
}

#[test]
fn the_role_grants_exactly_what_the_code_uses() {
    let role = std::fs::read_to_string(repo().join("helm/loraforge/templates/role.yaml")).unwrap();
    let list = |line: &str, key: &str| -> Option<Vec<String>> {
        let rest = line.trim().trim_start_matches("- ").strip_prefix(key)?;
        Some(serde_json::from_str(rest.trim()).expect("a JSON flow list"))
    };
    let mut rules = Vec::new();
    let (mut group, mut resource) = (None, None);
    for line in role.lines() {
        if let Some(g) = list(line, "apiGroups:") {
            group = Some(g.concat());
        } else if let Some(r) = list(line, "resources:") {
            resource = Some(r.concat());
        } else if let Some(verbs) = list(line, "verbs:") {
            rules.push((group.take().unwrap(), resource.take().unwrap(), verbs));
        }
    }
    let code: Vec<(String, String, Vec<String>)> = loraforge::operator::rbac::RULES
        .iter()
        .map(|(g, r, v)| {
            (
                g.to_string(),
                r.to_string(),
                v.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(rules, code);
}

/// Every field path of a schema (`training.max_steps`, `method.r`), following `$ref`,
/// `allOf` and `oneOf` (the union of the variants' fields).
fn paths(schema: &Value, defs: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return paths(&defs[name], defs, prefix, out);
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for part in schema[key].as_array().into_iter().flatten() {
            paths(part, defs, prefix, out);
        }
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        out.insert(path.clone());
        paths(property, defs, &path, out);
        paths(&property["items"], defs, &format!("{path}[]"), out);
    }
}

#[test]
fn the_crd_spec_has_the_fields_of_the_rest_jobspec() {
    let snapshot: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/snapshots/openapi.json")).unwrap(),
    )
    .unwrap();
    let defs = &snapshot["components"]["schemas"];
    let mut rest = BTreeSet::new();
    paths(&defs["JobSpec"], defs, "", &mut rest);
    let crd = serde_json::to_value(loraforge::crd::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut kube = BTreeSet::new();
    paths(spec, &Value::Null, "", &mut kube);
    assert!(rest.len() > 60, "{rest:?}");
    assert_eq!(kube, rest);
}
