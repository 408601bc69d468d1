//! [`AppState`]: what every handler gets, and the stream look-ups that apply the caller's
//! rights (tenant, ticket) and the tenant's limits.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Security, ticket},
    config::EdgeConfig,
    error::ApiError,
    hub::Hub,
    ids::StreamId,
    limits::Limiter,
    request::StreamSpec,
    stream::StreamState,
    tenant::Caller,
};

/// State every handler gets; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The stream hub.
    pub hub: Arc<Hub>,
    /// The configuration.
    pub config: Arc<EdgeConfig>,
    /// Authentication and tickets.
    pub security: Arc<Security>,
    /// Per-tenant stream limits.
    pub limiter: Arc<Limiter>,
}

impl AppState {
    /// Cancelled at shutdown (the lifecycle's `accepting` phase): streaming responses end so
    /// clients reconnect elsewhere.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.hub.lifecycle().accepting
    }

    /// The stream `id` as `caller` may see it: another tenant's stream is 404 exactly like an
    /// unknown one, everywhere; a ticket for another stream is 403.
    pub(crate) async fn stream_for(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Arc<StreamState>, ApiError> {
        if !caller.may_read(id) {
            return Err(ticket::out_of_scope());
        }
        self.hub.get_for(id, Some(caller.tenant())).await
    }

    /// [`AppState::stream_for`] for stopping a stream or minting a ticket for it: needs a
    /// credential of the tenant; a ticket only reads (403).
    pub(crate) async fn stream_to_manage(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Arc<StreamState>, ApiError> {
        if matches!(caller, Caller::Ticket { .. }) {
            return Err(ticket::out_of_scope());
        }
        self.stream_for(caller, id).await
    }

    /// Creates a stream owned by the caller's tenant, within the tenant's limits (429 past
    /// them); `transport` is the one starting it. Tickets cannot create streams (403).
    pub(crate) async fn create_stream(
        &self,
        caller: &Caller,
        mut spec: StreamSpec,
        parent: &tracing::Span,
        transport: &'static str,
    ) -> Result<Arc<StreamState>, ApiError> {
        let Caller::Tenant(tenant) = caller else {
            return Err(ticket::out_of_scope());
        };
        spec.tenant = tenant.to_string();
        let id = StreamId::random();
        self.limiter.admit(tenant, &id).await?;
        match self
            .hub
            .create_with_id(id.clone(), spec, parent, transport)
            .await
        {
            Ok(stream) => {
                self.limiter.track(&stream, self.hub.lifecycle());
                Ok(stream)
            }
            Err(error) => {
                self.limiter.release(tenant, &id).await;
                Err(error)
            }
        }
    }
}
