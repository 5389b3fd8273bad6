//! `hsm.v1.EventService`: the citizen-notification event stream and the notification
//! preferences. Who sees what: a login service its own tenant's events (and it reads
//! and sets its own subjects' preferences); a notifier and an auditor every tenant's.

use std::pin::Pin;

use hsm_proto::v1 as pb;
use hsm_proto::v1::event_service_server::EventService;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::State;
use crate::auth::{authorize, Identity, Role};
use crate::events::{Event, Filter, Page, Scope};

/// Who may read events.
const READERS: &[Role] = &[Role::LoginService, Role::Notifier, Role::Auditor];
/// Who may read and set preferences.
const PREFS: &[Role] = &[Role::LoginService];

/// The event service handler.
pub struct EventApi {
    state: State,
}

impl EventApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> EventApi {
        EventApi { state }
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::EventBatch, Status>> + Send>>;

fn scope(caller: &Identity) -> Scope {
    match caller.role {
        Role::LoginService => Scope::Tenant(caller.tenant.clone()),
        _ => Scope::All,
    }
}

fn to_proto(e: Event) -> pb::Event {
    let Event { seq, event: e } = e;
    pb::Event {
        seq,
        time_ms: e.time_ms,
        kind: e.kind,
        tenant: e.tenant,
        subject: e.subject,
        object_id: e.object_id,
        critical: e.critical,
        notify: e.notify,
        details_json: e.details_json,
    }
}

fn batch(p: Page) -> pb::EventBatch {
    pb::EventBatch {
        events: p.events.into_iter().map(to_proto).collect(),
        head_seq: p.head_seq,
    }
}

fn preference(
    subject: String,
    p: crate::store::events::NotificationPref,
) -> pb::NotificationPreference {
    pb::NotificationPreference {
        subject,
        every_use: p.every_use,
        updated_at: p.updated_at,
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    type WatchEventsStream = BatchStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let caller = authorize(&self.state.authorizer, &request, READERS)?;
        let r = request.get_ref();
        let filter = Filter::new(scope(&caller), &r.kinds, &r.subject)?;
        let rx = self.state.events.watch(filter, r.from_seq, r.follow)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|page| page.map(batch).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, READERS)?;
        let r = request.get_ref();
        let filter = Filter::new(scope(&caller), &r.kinds, &r.subject)?;
        let page = self.state.events.list(&filter, r.from_seq, r.limit).await?;
        Ok(Response::new(pb::ListEventsResponse {
            next_seq: page.next_seq,
            head_seq: page.head_seq,
            events: page.events.into_iter().map(to_proto).collect(),
        }))
    }

    async fn set_notification_preference(
        &self,
        request: Request<pb::SetNotificationPreferenceRequest>,
    ) -> Result<Response<pb::NotificationPreference>, Status> {
        let caller = authorize(&self.state.authorizer, &request, PREFS)?;
        let r = request.into_inner();
        let pref = self
            .state
            .events
            .set_preference(&caller.tenant, &r.subject, r.every_use)
            .await?;
        Ok(Response::new(preference(r.subject, pref)))
    }

    async fn get_notification_preference(
        &self,
        request: Request<pb::GetNotificationPreferenceRequest>,
    ) -> Result<Response<pb::NotificationPreference>, Status> {
        let caller = authorize(&self.state.authorizer, &request, PREFS)?;
        let r = request.into_inner();
        let pref = self
            .state
            .events
            .preference(&caller.tenant, &r.subject)
            .await?;
        Ok(Response::new(preference(r.subject, pref)))
    }
}
