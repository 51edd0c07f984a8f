//! The documented spans: `locker.acquire`, `locker.run` and `locker.release`, each with the
//! key, the owner hash and the fencing token as fields, and the job running inside
//! `locker.run`. One test (the subscriber is global to the process), with a layer that keeps
//! every span's fields.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use locker_core::{LockAttempt, Locker, MemoryBackend, ReleaseOutcome, RunOutcome};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as seen: its name and fields.
#[derive(Debug, Clone, Default)]
struct Seen {
    name: String,
    fields: BTreeMap<String, String>,
}

/// An event's message, with the name of the span it was in.
type SeenEvent = (Option<String>, String);

#[derive(Clone, Default)]
struct Capture {
    live: Arc<Mutex<BTreeMap<u64, Seen>>>,
    closed: Arc<Mutex<Vec<Seen>>>,
    /// Events, with the span they were in.
    events: Arc<Mutex<Vec<SeenEvent>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut seen = Seen {
            name: attrs.metadata().name().to_owned(),
            ..Seen::default()
        };
        attrs.record(&mut Fields(&mut seen.fields));
        self.live.lock().expect("lock").insert(id.into_u64(), seen);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(seen) = self.live.lock().expect("lock").get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut seen.fields));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let span = ctx.event_span(event).map(|s| s.name().to_owned());
        let message = fields.remove("message").unwrap_or_default();
        self.events.lock().expect("lock").push((span, message));
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(seen) = self.live.lock().expect("lock").remove(&id.into_u64()) {
            self.closed.lock().expect("lock").push(seen);
        }
    }
}

impl Capture {
    /// The closed spans named `name` whose `key` field is `key`.
    fn closed(&self, name: &str, key: &str) -> Vec<Seen> {
        self.closed
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.name == name && s.fields.get("key").map(String::as_str) == Some(key))
            .cloned()
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_run_and_release_have_spans_with_key_owner_and_token() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber of this test binary");
    let store = MemoryBackend::new();
    let locker = Locker::builder(store)
        .report_every(Duration::from_millis(50))
        .liveness_ttl(Duration::from_millis(500))
        .build()
        .expect("options");

    // acquire + release.
    let guard = match locker.acquire("spans-a").await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    let (owner, token) = (
        guard.owner_hash().to_owned(),
        guard.fencing_token().expect("the memory store fences"),
    );
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    let acquire = capture.closed("locker.acquire", "spans-a");
    assert_eq!(acquire.len(), 1, "{acquire:?}");
    assert_eq!(acquire[0].fields["owner_hash"], owner, "{acquire:?}");
    assert_eq!(acquire[0].fields["fencing_token"], token.to_string());
    let release = capture.closed("locker.release", "spans-a");
    assert_eq!(release.len(), 1, "{release:?}");
    assert_eq!(release[0].fields["owner_hash"], owner);
    assert_eq!(release[0].fields["fencing_token"], token.to_string());

    // acquire_and_run: the job runs inside `locker.run`, whose fields name the lock.
    let outcome = locker
        .acquire_and_run("spans-b", |beat| async move {
            tracing::info!("the job runs");
            (beat.owner_hash().to_owned(), beat.fencing_token())
        })
        .await
        .expect("run");
    let RunOutcome::Ran((owner, token)) = outcome else {
        panic!("not run: {outcome:?}");
    };
    let run = capture.closed("locker.run", "spans-b");
    assert_eq!(run.len(), 1, "{run:?}");
    assert_eq!(run[0].fields["owner_hash"], owner);
    assert_eq!(
        run[0].fields["fencing_token"],
        token.expect("fenced").to_string()
    );
    assert!(
        capture
            .events
            .lock()
            .expect("lock")
            .contains(&(Some("locker.run".to_owned()), "the job runs".to_owned())),
        "the job's event is not inside locker.run"
    );
    assert_eq!(capture.closed("locker.acquire", "spans-b").len(), 1);
    assert_eq!(capture.closed("locker.release", "spans-b").len(), 1);
    locker.shutdown().await;
}
