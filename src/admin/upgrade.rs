//! `POST /upgrade`: starts the new binary, answers its pid once it serves, or why it did not.

use super::json;
use crate::lifecycle::UpgradeError;
use crate::ServerHandle;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

/// 200 with the new pid (this process then drains and exits); 500 with the reason when the new
/// process failed (this one keeps serving); 409 while another upgrade runs; 503 when this process
/// cannot upgrade (draining, already handed over, not the gatehouse binary).
pub async fn post(handle: &ServerHandle) -> Response<Full<Bytes>> {
    match handle.upgrade().await {
        Ok(report) => json(
            StatusCode::OK,
            serde_json::json!({
                "result": "ok",
                "pid": report.pid,
                "previous_pid": report.previous_pid,
            }),
        ),
        Err(e) => {
            let (status, result) = match e {
                UpgradeError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
                UpgradeError::InProgress(_) => (StatusCode::CONFLICT, "refused"),
                UpgradeError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "refused"),
            };
            json(
                status,
                serde_json::json!({ "result": result, "reason": e.to_string(), "pid": std::process::id() }),
            )
        }
    }
}
