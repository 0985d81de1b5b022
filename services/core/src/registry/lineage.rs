//! Lineage as a graph: adapter versions, the jobs that made them, their datasets and
//! base models, parent versions, and bases made by merging a version. Walked from one
//! version towards its ancestors or its descendants, a bounded number of hops.

use super::{get_version, VersionRow, VersionStatus};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::{BTreeSet, VecDeque};

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Node {
    AdapterVersion {
        id: String,
        adapter_name: String,
        version: i32,
        status: VersionStatus,
    },
    Job {
        id: String,
        job_id: uuid::Uuid,
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
}

impl Node {
    fn id(&self) -> &str {
        match self {
            Node::AdapterVersion { id, .. }
            | Node::Job { id, .. }
            | Node::Dataset { id, .. }
            | Node::BaseModel { id, .. } => id,
        }
    }
}

/// `from` went into `to`: inputs into jobs, jobs into versions, versions into merged bases.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord, utoipa::ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
    #[schema(value_type = String)]
    pub relation: &'static str,
}

pub fn version_id(adapter: &str, version: i32) -> String {
    format!("adapter_version:{adapter}@{version}")
}

fn base_id(uri: &str) -> String {
    format!("base_model:{uri}")
}

#[derive(Default)]
struct Builder {
    graph: Graph,
    seen: BTreeSet<String>,
    edges: BTreeSet<(String, String)>,
}

impl Builder {
    fn node(&mut self, node: Node) {
        if self.seen.insert(node.id().to_string()) {
            self.graph.nodes.push(node);
        }
    }
    fn edge(&mut self, from: String, to: String, relation: &'static str) {
        if self.edges.insert((from.clone(), to.clone())) {
            self.graph.edges.push(Edge { from, to, relation });
        }
    }
    /// A version with its job and that job's inputs.
    fn version(&mut self, v: &VersionRow) -> String {
        let vid = version_id(&v.adapter_name, v.version);
        let jid = format!("job:{}", v.job_id);
        self.node(Node::AdapterVersion {
            id: vid.clone(),
            adapter_name: v.adapter_name.clone(),
            version: v.version,
            status: v.status,
        });
        self.node(Node::Job {
            id: jid.clone(),
            job_id: v.job_id,
        });
        let did = format!("dataset:{}", v.dataset_uri);
        self.node(Node::Dataset {
            id: did.clone(),
            uri: v.dataset_uri.clone(),
            sha256: v.dataset_sha256.clone(),
            name: v.dataset_name.clone(),
        });
        let bid = base_id(&v.base_model_uri);
        self.node(Node::BaseModel {
            id: bid.clone(),
            uri: v.base_model_uri.clone(),
            sha256: v.base_model_sha256.clone(),
            name: v.base_model_name.clone(),
        });
        self.edge(jid.clone(), vid.clone(), "produced");
        self.edge(did, jid.clone(), "dataset_of");
        self.edge(bid, jid.clone(), "base_model_of");
        if let Some((adapter, version)) = v.parent() {
            self.edge(version_id(&adapter, version), jid, "parent_of");
        }
        vid
    }
}

/// The registered base model a version was trained on, if it came from merging a version.
async fn merged_source(
    pool: &PgPool,
    project: &str,
    v: &VersionRow,
) -> Result<Option<(String, i32)>, sqlx::Error> {
    merged_source_of(
        pool,
        project,
        v.base_model_name.as_deref(),
        &v.base_model_uri,
    )
    .await
}

/// The version a registered base model (by name, or by URI) was merged from, if any.
pub async fn merged_source_of(
    pool: &PgPool,
    project: &str,
    base_model_name: Option<&str>,
    base_model_uri: &str,
) -> Result<Option<(String, i32)>, sqlx::Error> {
    let row = sqlx::query!(
        "SELECT source_adapter, source_version FROM base_models
         WHERE project = $1 AND (name = $2 OR uri = $3) AND source_adapter IS NOT NULL LIMIT 1",
        project,
        base_model_name,
        base_model_uri,
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.source_adapter, r.source_version));
    Ok(row.and_then(|(a, n)| Some((a?, n?))))
}

/// The version, its ancestors up to `depth` hops, and their inputs.
pub async fn ancestors(
    pool: &PgPool,
    project: &str,
    root: &VersionRow,
    depth: u32,
) -> Result<Graph, sqlx::Error> {
    let mut b = Builder::default();
    let mut queue = VecDeque::from([(root.clone(), 0u32)]);
    while let Some((v, d)) = queue.pop_front() {
        b.version(&v);
        if d >= depth {
            continue;
        }
        if let Some((adapter, version)) = v.parent() {
            if let Some(parent) = get_version(pool, project, &adapter, version).await? {
                queue.push_back((parent, d + 1));
            }
        }
        if let Some((adapter, version)) = merged_source(pool, project, &v).await? {
            if let Some(source) = get_version(pool, project, &adapter, version).await? {
                b.edge(
                    version_id(&adapter, version),
                    base_id(&v.base_model_uri),
                    "merged_into",
                );
                queue.push_back((source, d + 1));
            }
        }
    }
    Ok(b.graph)
}

/// Versions trained from this one (as parent, or on a base merged from it), `depth` hops.
pub async fn descendants(
    pool: &PgPool,
    project: &str,
    root: &VersionRow,
    depth: u32,
) -> Result<Graph, sqlx::Error> {
    let mut b = Builder::default();
    let mut queue = VecDeque::from([(root.clone(), 0u32)]);
    while let Some((v, d)) = queue.pop_front() {
        let vid = b.version(&v);
        if d >= depth {
            continue;
        }
        let children: Vec<VersionRow> = query_versions!(
            "SELECT ",
            " FROM adapter_versions v WHERE project = $1 AND (
                 (parent_adapter = $2 AND parent_version = $3)
                 OR EXISTS (SELECT 1 FROM base_models b
                            WHERE b.project = v.project AND b.source_adapter = $2 AND b.source_version = $3
                              AND (v.base_model_name = b.name OR v.base_model_uri = b.uri)))
               ORDER BY adapter_name, version",
            project,
            &v.adapter_name,
            v.version,
        )
        .fetch_all(pool)
        .await?;
        for child in children {
            if child
                .parent()
                .is_none_or(|(adapter, version)| adapter != v.adapter_name || version != v.version)
            {
                b.edge(vid.clone(), base_id(&child.base_model_uri), "merged_into");
            }
            queue.push_back((child, d + 1));
        }
    }
    Ok(b.graph)
}
