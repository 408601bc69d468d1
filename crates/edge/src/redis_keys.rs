//! The Redis keys of the edge: the only place that knows their names.
//!
//! Every key carries a hash tag, so that the keys one script touches share a Redis Cluster
//! slot: a stream's keys are tagged with the stream id (the store, [`crate::store::redis`]),
//! a tenant's limit keys with the tenant (the limiter, [`crate::limits::redis`]).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::ids::StreamId;

/// `tokenfan:{<id>}:meta`, a HASH.
pub fn meta(id: &StreamId) -> String {
    format!("tokenfan:{{{id}}}:meta")
}

/// `tokenfan:{<id>}:events`, a LIST of event JSON (element `i` is seq `i + 1`).
pub fn events(id: &StreamId) -> String {
    format!("tokenfan:{{{id}}}:events")
}

/// `tokenfan:{<id>}:batches`, a LIST of `"<epoch> <first> <last>"`.
pub fn batches(id: &StreamId) -> String {
    format!("tokenfan:{{{id}}}:batches")
}

/// `tokenfan:{<id>}:lease`, a STRING (the owner) with a TTL.
pub fn lease(id: &StreamId) -> String {
    format!("tokenfan:{{{id}}}:lease")
}

/// The hash tag of a tenant's keys (the tenant in base64url: any string makes a valid tag).
fn tenant_tag(tenant: &str) -> String {
    format!("tokenfan:{{tenant:{}}}", URL_SAFE_NO_PAD.encode(tenant))
}

/// `tokenfan:{tenant:<b64>}:bucket`, a HASH (`tokens`, `at` in ms): the creation rate bucket.
pub fn tenant_bucket(tenant: &str) -> String {
    format!("{}:bucket", tenant_tag(tenant))
}

/// `tokenfan:{tenant:<b64>}:active`, a ZSET of stream ids scored by lease expiry (ms).
pub(crate) fn tenant_active(tenant: &str) -> String {
    format!("{}:active", tenant_tag(tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_shares_one_hash_tag() {
        let id = StreamId::random();
        let tag = format!("{{{id}}}");
        for key in [meta(&id), events(&id), batches(&id), lease(&id)] {
            assert!(key.contains(&tag), "{key}");
        }
        assert!(tenant_bucket("a{b}").starts_with("tokenfan:{tenant:"));
        let tag = |k: &str| k[..k.find('}').map_or(0, |i| i + 1)].to_owned();
        assert_eq!(tag(&tenant_bucket("x")), tag(&tenant_active("x")));
        assert_ne!(tag(&tenant_bucket("x")), tag(&tenant_bucket("y")));
    }
}
