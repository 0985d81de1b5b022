//! Leader election over a `coordination.k8s.io` Lease, so one control-plane replica runs
//! the operator while the others wait: the holder renews the Lease; another replica takes
//! it over only once it has not been renewed for its duration. Updates carry the Lease's
//! resourceVersion (a conflict answers 409), so two replicas racing for it cannot both win.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderElection {
    pub fn new(api: Api<Lease>, name: &str, identity: String, duration: Duration) -> Self {
        LeaderElection {
            api,
            name: name.into(),
            identity,
            duration,
        }
    }

    fn lease(&self, resource_version: Option<String>, acquired: Option<String>) -> Lease {
        let now = micro_time(Timestamp::now());
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "resourceVersion": resource_version},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration.as_secs(),
                "acquireTime": acquired.unwrap_or_else(|| now.clone()),
                "renewTime": now,
            },
        }))
        .expect("a Lease matches the Lease schema")
    }

    /// Takes or renews the Lease; true when this replica holds it afterwards.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return match self
                .api
                .create(&PostParams::default(), &self.lease(None, None))
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = match (spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => renewed
                .0
                .checked_add(SignedDuration::from_secs(i64::from(secs)))
                .map_or(true, |until| until < Timestamp::now()),
            _ => true,
        };
        if !mine && !expired {
            return Ok(false);
        }
        let acquired = if mine {
            spec.acquire_time.map(|t| micro_time(t.0))
        } else {
            None
        };
        // A merge patch that names the resourceVersion it read: the API server refuses it
        // (409) if the Lease changed since.
        let lease = self.lease(current.metadata.resource_version.clone(), acquired);
        let patch = Patch::Merge(&lease);
        match self
            .api
            .patch(&self.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else renewed or took it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// RFC 3339 with microseconds, as `MicroTime` is written.
fn micro_time(t: Timestamp) -> String {
    format!(
        "{}.{:06}Z",
        t.strftime("%Y-%m-%dT%H:%M:%S"),
        t.subsec_microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_mock::{expect, mock_client, not_found, status};
    use http::Method;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ml/leases/loraforge-operator";

    fn election(client: kube::Client, me: &str) -> LeaderElection {
        LeaderElection::new(
            Api::namespaced(client, "ml"),
            "loraforge-operator",
            me.into(),
            Duration::from_secs(15),
        )
    }

    fn lease(holder: &str, renewed: Timestamp) -> serde_json::Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "loraforge-operator", "namespace": "ml", "resourceVersion": "41"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                "acquireTime": micro_time(renewed), "renewTime": micro_time(renewed)}})
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_leads() {
        let (client, mut server) = mock_client();
        let run = tokio::spawn(async move { election(client, "a").try_lead().await });
        expect(&mut server, Method::GET, PATH, not_found()).await;
        let (_, body) = expect(
            &mut server,
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/ml/leases",
            (201, json!({})),
        )
        .await;
        assert_eq!(body["spec"]["holderIdentity"], "a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert!(run.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_fresh_lease_of_another_replica_is_left_alone() {
        let (client, mut server) = mock_client();
        let run = tokio::spawn(async move { election(client, "b").try_lead().await });
        expect(
            &mut server,
            Method::GET,
            PATH,
            (200, lease("a", Timestamp::now())),
        )
        .await;
        assert!(
            !run.await.unwrap().unwrap(),
            "b must not lead while a renews"
        );
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_naming_the_version_read() {
        let (client, mut server) = mock_client();
        let run = tokio::spawn(async move { election(client, "b").try_lead().await });
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        expect(&mut server, Method::GET, PATH, (200, lease("a", stale))).await;
        let (_, body) = expect(&mut server, Method::PATCH, PATH, (200, json!({}))).await;
        assert_eq!(body["spec"]["holderIdentity"], "b");
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert!(run.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn losing_the_race_for_a_lease_is_not_leading() {
        let (client, mut server) = mock_client();
        let run = tokio::spawn(async move { election(client, "b").try_lead().await });
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        expect(&mut server, Method::GET, PATH, (200, lease("a", stale))).await;
        expect(&mut server, Method::PATCH, PATH, status(409, "Conflict")).await;
        assert!(!run.await.unwrap().unwrap());
    }
}
