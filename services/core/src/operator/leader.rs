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
