//! `GET /flows?follow=true`: the stored records that match (the newest
//! `last`), then every new matching record as it is recorded, as JSON Lines
//! over a chunked response that stays open until the client goes away or
//! the agent stops.
//!
//! The response body reads the subscriber's bounded queue
//! ([`crate::flows::subscribers`]); the recording side only ever
//! `try_send`s into it. When records were lost because the client read too
//! slowly, the stream says so in place, before the next record (or as soon
//! as the queue is drained): a line `{"lost": N}` with the number lost since
//! the previous notice.
//!
//! [`open`] admits the stream or, beyond the subscriber caps
//! ([`crate::flows::subscribers::MAX_SUBSCRIBERS`] live streams, and
//! [`crate::flows::subscribers::MAX_QUEUED_TOTAL`] queued records over all
//! of them), answers 503 with a JSON `error` saying which cap was hit.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame},
    header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER},
    Response, StatusCode,
};
use serde_json::json;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::AnyBody;
use crate::{
    flow_filter::FlowFilter,
    flows::{
        subscribers::{self, Delivery, SubscribeError, Subscription},
        FlowLog, FlowRecord,
    },
};

/// Opens a flow stream over `flows` for `filter` (which asked to follow)
/// that ends when `stop` fires; 503 beyond the subscriber caps.
pub fn open(flows: &FlowLog, filter: FlowFilter, stop: &CancellationToken) -> Response<AnyBody> {
    let queue = filter.queue.unwrap_or(subscribers::DEFAULT_QUEUE);
    match flows.subscribe(filter, queue) {
        Ok(sub) => {
            tracing::debug!(subscriber = sub.id, "flow stream opened");
            let mut r = Response::new(FlowStream::new(sub, stop.child_token()).boxed());
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/jsonl"));
            r
        }
        Err(e) => {
            tracing::debug!(error = %e, "flow stream refused");
            refused(&e).map(BodyExt::boxed)
        }
    }
}

/// 503 with the reason and the caps as JSON, and a hint to retry.
fn refused(e: &SubscribeError) -> Response<http_body_util::Full<Bytes>> {
    let mut r = super::json_response(&json!({
        "error": e.to_string(),
        "maxSubscribers": subscribers::MAX_SUBSCRIBERS,
        "maxQueuedTotal": subscribers::MAX_QUEUED_TOTAL,
    }));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// The body of a flow stream.
pub struct FlowStream {
    sub: Subscription,
    backlog: std::vec::IntoIter<FlowRecord>,
    /// Losses already reported.
    reported: u64,
    /// A record held back while its loss notice goes first.
    pending: Option<Delivery>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl FlowStream {
    /// A stream over `sub` that ends when `stop` fires.
    #[must_use]
    pub fn new(mut sub: Subscription, stop: CancellationToken) -> Self {
        let backlog = std::mem::take(&mut sub.backlog).into_iter();
        Self { sub, backlog, reported: 0, pending: None, stop: Box::pin(stop.cancelled_owned()) }
    }

    fn notice(&mut self, lost: u64) -> Option<Bytes> {
        (lost > self.reported).then(|| {
            let line = format!("{{\"lost\":{}}}\n", lost - self.reported);
            self.reported = lost;
            Bytes::from(line)
        })
    }
}

fn line(record: &FlowRecord) -> Bytes {
    let mut v = serde_json::to_vec(record).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

impl Body for FlowStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(r) = this.backlog.next() {
            return Poll::Ready(Some(Ok(Frame::data(line(&r)))));
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let next = match this.pending.take() {
            Some(d) => Some(d),
            None => match this.sub.rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => Some(d),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => None,
            },
        };
        if let Some(d) = next {
            if let Some(notice) = this.notice(d.lost_before) {
                this.pending = Some(d);
                return Poll::Ready(Some(Ok(Frame::data(notice))));
            }
            return Poll::Ready(Some(Ok(Frame::data(line(&d.record)))));
        }
        // Drained: report losses that no queued record will carry.
        let lost = this.sub.lost.load(Ordering::Relaxed);
        match this.notice(lost) {
            Some(notice) => Poll::Ready(Some(Ok(Frame::data(notice)))),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        flow_filter::FlowFilter,
        flows::{ConnInfo, Direction, FlowLog},
        registry::ObjectRef,
    };
    use http_body_util::BodyExt;

    fn fail(log: &FlowLog, conn: u64) {
        let i = ConnInfo::new(Direction::Outbound, ObjectRef { namespace: "demo".into(), name: "client".into() });
        log.failed(conn, &i, "x".into());
    }

    async fn next_line(body: &mut FlowStream) -> serde_json::Value {
        let frame = body.frame().await.unwrap().unwrap();
        serde_json::from_slice(frame.data_ref().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn streams_the_backlog_then_new_records_and_says_how_many_were_lost() {
        let log = FlowLog::new(100);
        fail(&log, 1);
        let filter = FlowFilter { last: 10, ..FlowFilter::default() };
        let stop = CancellationToken::new();
        let mut body = FlowStream::new(log.subscribe(filter, 2).unwrap(), stop.clone());
        for conn in 2..=6 {
            fail(&log, conn);
        }
        assert_eq!(next_line(&mut body).await["conn"], 1);
        assert_eq!(next_line(&mut body).await["conn"], 2);
        assert_eq!(next_line(&mut body).await["conn"], 3);
        assert_eq!(next_line(&mut body).await, serde_json::json!({"lost": 3}));
        fail(&log, 7);
        assert_eq!(next_line(&mut body).await["conn"], 7);
        stop.cancel();
        assert!(body.frame().await.is_none());
    }

    fn following(queue: Option<usize>) -> FlowFilter {
        FlowFilter { follow: true, queue, ..FlowFilter::default() }
    }

    async fn json_body(r: Response<AnyBody>) -> serde_json::Value {
        let body = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn streams_beyond_the_subscriber_cap_get_503_with_a_json_error() {
        let log = FlowLog::new(10);
        let stop = CancellationToken::new();
        let open_streams: Vec<_> =
            (0..subscribers::MAX_SUBSCRIBERS).map(|_| open(&log, following(None), &stop)).collect();
        assert!(open_streams.iter().all(|r| r.status() == StatusCode::OK));
        let r = open(&log, following(None), &stop);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let v = json_body(r).await;
        let error = v["error"].as_str().unwrap();
        assert!(error.contains("too many flow subscribers"), "{error}");
        assert_eq!(v["maxSubscribers"], subscribers::MAX_SUBSCRIBERS);
        // A client that leaves frees its place.
        drop(open_streams);
        assert_eq!(open(&log, following(None), &stop).status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_queue_beyond_the_total_budget_gets_503() {
        let log = FlowLog::new(10);
        let stop = CancellationToken::new();
        let max = Some(subscribers::MAX_QUEUE);
        let _a = open(&log, following(max), &stop);
        let _b = open(&log, following(max), &stop);
        let r = open(&log, following(None), &stop);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v = json_body(r).await;
        assert!(v["error"].as_str().unwrap().contains("queues are full"), "{v}");
    }
}
