//! A lineage graph (`…/lineage` or `…/descendants`) drawn as a tree in the terminal: from
//! the version, each node's inputs (or, for descendants, what was made from it) below it.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Graph {
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Node {
    AdapterVersion {
        id: String,
        adapter_name: String,
        version: i64,
        status: String,
    },
    Job {
        id: String,
        job_id: String,
    },
    Dataset {
        id: String,
        uri: String,
        sha256: Option<String>,
        name: Option<String>,
    },
    BaseModel {
        id: String,
        uri: String,
        sha256: Option<String>,
        name: Option<String>,
    },
    #[serde(other)]
    Other,
}

impl Node {
    fn id(&self) -> Option<&str> {
        match self {
            Node::AdapterVersion { id, .. }
            | Node::Job { id, .. }
            | Node::Dataset { id, .. }
            | Node::BaseModel { id, .. } => Some(id),
            Node::Other => None,
        }
    }

    fn label(&self) -> String {
        match self {
            Node::AdapterVersion {
                adapter_name,
                version,
                status,
                ..
            } => format!("{adapter_name}@{version} [{status}]"),
            Node::Job { job_id, .. } => format!("job {job_id}"),
            Node::Dataset {
                uri, sha256, name, ..
            } => input_label("dataset", uri, sha256, name),
            Node::BaseModel {
                uri, sha256, name, ..
            } => input_label("base model", uri, sha256, name),
            Node::Other => "?".into(),
        }
    }

    /// Children are listed base model, dataset, versions, jobs: inputs before ancestors.
    fn rank(&self) -> u8 {
        match self {
            Node::BaseModel { .. } => 0,
            Node::Dataset { .. } => 1,
            Node::AdapterVersion { .. } => 2,
            Node::Job { .. } => 3,
            Node::Other => 4,
        }
    }
}

fn input_label(what: &str, uri: &str, sha256: &Option<String>, name: &Option<String>) -> String {
    let mut label = match name {
        Some(name) => format!("{what} {name} ({uri})"),
        None => format!("{what} {uri}"),
    };
    if let Some(sha) = sha256 {
        label.push_str(&format!(" sha256:{}", &sha[..sha.len().min(12)]));
    }
    label
}

#[derive(Debug, Clone, Deserialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub relation: String,
}

/// Which way the tree grows from its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Below a node: what went into it (its job, the job's inputs, the parent version).
    Ancestors,
    /// Below a node: what came out of it.
    Descendants,
}

/// The tree under `root` (a node id), one line per node, with box-drawing branches. A node
/// reached twice is drawn once in full and then as "(see above)".
pub fn draw(graph: &Graph, root: &str, direction: Direction) -> String {
    let nodes: BTreeMap<&str, &Node> = graph
        .nodes
        .iter()
        .filter_map(|n| Some((n.id()?, n)))
        .collect();
    let mut children: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for e in &graph.edges {
        let (parent, child) = match direction {
            Direction::Ancestors => (e.to.as_str(), e.from.as_str()),
            Direction::Descendants => (e.from.as_str(), e.to.as_str()),
        };
        children
            .entry(parent)
            .or_default()
            .push((child, e.relation.as_str()));
    }
    for list in children.values_mut() {
        list.sort_by_key(|(id, _)| (nodes.get(id).map_or(9, |n| n.rank()), *id));
        list.dedup();
    }
    let mut out = String::new();
    let mut seen = BTreeSet::new();
    let label = |id: &str| nodes.get(id).map_or_else(|| id.to_string(), |n| n.label());
    out.push_str(&label(root));
    out.push('\n');
    seen.insert(root.to_string());
    walk(root, "", direction, &children, &label, &mut seen, &mut out);
    out
}

fn walk(
    id: &str,
    indent: &str,
    direction: Direction,
    children: &BTreeMap<&str, Vec<(&str, &str)>>,
    label: &dyn Fn(&str) -> String,
    seen: &mut BTreeSet<String>,
    out: &mut String,
) {
    let Some(list) = children.get(id) else {
        return;
    };
    for (i, (child, relation)) in list.iter().enumerate() {
        let last = i + 1 == list.len();
        let (branch, more) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let how = match (direction, *relation) {
            (Direction::Ancestors, "parent_of") => "parent ",
            (Direction::Ancestors, "merged_into") => "merged from ",
            (Direction::Descendants, "parent_of") => "continued by ",
            (Direction::Descendants, "merged_into") => "merged into ",
            _ => "",
        };
        let first_time = seen.insert(child.to_string());
        let again = if first_time || !children.contains_key(child) {
            ""
        } else {
            " (see above)"
        };
        out.push_str(&format!("{indent}{branch}{how}{}{again}\n", label(child)));
        if first_time {
            let indent = format!("{indent}{more}");
            walk(child, &indent, direction, children, label, seen, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// demo@2 was trained from demo@1 on a base merged from other@1; both jobs used `chat`.
    fn graph() -> Graph {
        serde_json::from_value(json!({
            "nodes": [
                {"type": "adapter_version", "id": "adapter_version:demo@2", "adapter_name": "demo", "version": 2, "status": "ready"},
                {"type": "job", "id": "job:j2", "job_id": "j2"},
                {"type": "dataset", "id": "dataset:file:///d/chat.jsonl", "uri": "file:///d/chat.jsonl",
                 "sha256": "0123456789abcdef0123", "name": "chat"},
                {"type": "base_model", "id": "base_model:file:///m/merged", "uri": "file:///m/merged", "sha256": null, "name": null},
                {"type": "adapter_version", "id": "adapter_version:demo@1", "adapter_name": "demo", "version": 1, "status": "ready"},
                {"type": "job", "id": "job:j1", "job_id": "j1"},
                {"type": "base_model", "id": "base_model:file:///m/base", "uri": "file:///m/base", "sha256": "ffffffffffffffffff", "name": "smol"},
                {"type": "adapter_version", "id": "adapter_version:other@1", "adapter_name": "other", "version": 1, "status": "quarantined"},
                {"type": "job", "id": "job:j0", "job_id": "j0"},
                {"type": "some_future_node", "id": "x"}
            ],
            "edges": [
                {"from": "job:j2", "to": "adapter_version:demo@2", "relation": "produced"},
                {"from": "dataset:file:///d/chat.jsonl", "to": "job:j2", "relation": "dataset_of"},
                {"from": "base_model:file:///m/merged", "to": "job:j2", "relation": "base_model_of"},
                {"from": "adapter_version:demo@1", "to": "job:j2", "relation": "parent_of"},
                {"from": "job:j1", "to": "adapter_version:demo@1", "relation": "produced"},
                {"from": "dataset:file:///d/chat.jsonl", "to": "job:j1", "relation": "dataset_of"},
                {"from": "base_model:file:///m/base", "to": "job:j1", "relation": "base_model_of"},
                {"from": "adapter_version:other@1", "to": "base_model:file:///m/merged", "relation": "merged_into"},
                {"from": "job:j0", "to": "adapter_version:other@1", "relation": "produced"},
                {"from": "base_model:file:///m/base", "to": "job:j0", "relation": "base_model_of"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn ancestors_draw_as_a_tree() {
        let tree = draw(&graph(), "adapter_version:demo@2", Direction::Ancestors);
        assert_eq!(
            tree,
            "\
demo@2 [ready]
└── job j2
    ├── base model file:///m/merged
    │   └── merged from other@1 [quarantined]
    │       └── job j0
    │           └── base model smol (file:///m/base) sha256:ffffffffffff
    ├── dataset chat (file:///d/chat.jsonl) sha256:0123456789ab
    └── parent demo@1 [ready]
        └── job j1
            ├── base model smol (file:///m/base) sha256:ffffffffffff
            └── dataset chat (file:///d/chat.jsonl) sha256:0123456789ab
"
        );
    }

    #[test]
    fn descendants_grow_the_other_way_and_shared_nodes_are_drawn_once() {
        let tree = draw(
            &graph(),
            "base_model:file:///m/base",
            Direction::Descendants,
        );
        assert_eq!(
            tree,
            "\
base model smol (file:///m/base) sha256:ffffffffffff
├── job j0
│   └── other@1 [quarantined]
│       └── merged into base model file:///m/merged
│           └── job j2
│               └── demo@2 [ready]
└── job j1
    └── demo@1 [ready]
        └── continued by job j2 (see above)
"
        );
    }

    #[test]
    fn a_lone_version_is_one_line() {
        let tree = draw(
            &Graph::default(),
            "adapter_version:x@1",
            Direction::Ancestors,
        );
        assert_eq!(tree, "adapter_version:x@1\n");
    }
}
