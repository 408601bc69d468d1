//! The admin listener (`--admin-listen`, default 127.0.0.1:9465): `/metrics`, `/readyz` and
//! `/healthz`, kept off the public port so that neither scrapers' data nor readiness probes are
//! open to clients (and `/readyz` cannot be used to make the edge fan out health checks).
//!
//! Readiness is checked in the background every [`CHECK_EVERY`] and cached: a `/readyz`
//! request reads the last result and costs nothing. The edge is ready when it can serve a
//! stream: at least one generator answers its health check as serving, the store answers,
//! the bus is connected, and shutdown has not begun.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{error::ApiError, hub::Hub};

/// How often readiness is checked.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The last readiness check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Checks {
    /// Generators that answered as serving.
    pub generators_serving: usize,
    /// Generators configured.
    pub generators: usize,
    /// The store answered.
    pub store: bool,
    /// The bus is connected.
    pub bus: bool,
    /// At least one check ran.
    pub checked: bool,
}

/// Readiness, checked in the background and read by `/readyz`.
#[derive(Clone, Default)]
pub(crate) struct Readiness {
    last: Arc<RwLock<Checks>>,
}

impl Readiness {
    /// The last result.
    pub(crate) fn last(&self) -> Checks {
        *self.last.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks now, then every [`CHECK_EVERY`] until `stop`.
    pub(crate) async fn keep_checking(self, hub: Arc<Hub>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let (generators_serving, (store, bus)) =
                tokio::join!(hub.generators().serving(), hub.backends_healthy());
            let checks = Checks {
                generators_serving,
                generators: hub.generators().count(),
                store,
                bus,
                checked: true,
            };
            *self.last.write().unwrap_or_else(|e| e.into_inner()) = checks;
        }
    }
}

/// What the admin endpoints need.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The cached readiness.
    pub readiness: Readiness,
    /// Cancelled at shutdown: `/readyz` then answers 503 so balancers stop sending traffic.
    pub shutdown: CancellationToken,
}

/// The admin router.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::AdminNotFound })
        .with_state(state)
}

/// `GET /healthz` (on both listeners): the process answers.
pub(crate) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(admin): State<AdminState>) -> Response {
    let c = admin.readiness.last();
    let shutting_down = admin.shutdown.is_cancelled();
    let generator = c.generators_serving >= 1;
    let ready = c.checked && generator && c.store && c.bus && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ok = |b: bool| if b { "ok" } else { "down" };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "generator": if !c.checked { "pending" } else { ok(generator) },
            "generators_serving": c.generators_serving,
            "generators": c.generators,
            "store": if !c.checked { "pending" } else { ok(c.store) },
            "bus": if !c.checked { "pending" } else { ok(c.bus) },
            "shutdown": if shutting_down { "draining" } else { "no" },
        },
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(admin): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
        .into_response()
}
