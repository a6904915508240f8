//! `POST /reload`: re-reads the configuration file, answers what changed or why it was refused.

use super::json;
use crate::config::Finding;
use crate::lifecycle::reload::{ListenerAt, ListenerReport};
use crate::lifecycle::{ReloadError, ReloadTrigger};
use crate::ServerHandle;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

/// 200 with what changed; 422 with the findings when the new configuration is invalid; 503 when
/// the server cannot reload now (draining, or nothing to re-read). Either refusal changed nothing.
pub async fn post(handle: &ServerHandle) -> Response<Full<Bytes>> {
    match handle.reload_from_source_by(ReloadTrigger::Admin).await {
        Ok(report) => json(
            StatusCode::OK,
            serde_json::json!({
                "result": "ok",
                "changed": report.changed,
                "listeners": listeners(&report.listeners),
                "warnings": report.warnings.iter().map(finding).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => {
            let status = match e {
                ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                ReloadError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            json(
                status,
                serde_json::json!({
                    "result": "refused",
                    "findings": e.findings().iter().map(finding).collect::<Vec<_>>(),
                }),
            )
        }
    }
}

/// `{"added": [{"name", "address"}], "removed": [...], "moved": [{"name", "from", "to"}], "switched": [...]}`
fn listeners(r: &ListenerReport) -> serde_json::Value {
    let at = |v: &[ListenerAt]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|l| serde_json::json!({ "name": l.name, "address": l.address.to_string() }))
            .collect()
    };
    let moved: Vec<serde_json::Value> = r
        .moved
        .iter()
        .map(|m| serde_json::json!({ "name": m.name, "from": m.from.to_string(), "to": m.to.to_string() }))
        .collect();
    serde_json::json!({
        "added": at(&r.added),
        "removed": at(&r.removed),
        "moved": moved,
        "switched": at(&r.switched),
    })
}

fn finding(f: &Finding) -> serde_json::Value {
    serde_json::json!({ "key": f.key, "message": f.problem, "fix": f.fix })
}
