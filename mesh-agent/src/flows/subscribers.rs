//! Live flow subscribers: each has a filter and a bounded queue. Records
//! are offered with `try_send` under the flow log's ring lock, so
//! publishing costs a filter check and, for a match, an `Arc` clone; it
//! never waits. A full queue (a slow or stalled reader) loses the record:
//! counted for that subscriber and in a total that outlives it
//! (`/stats`, `heddle status`, `heddle_flow_subscriber_dropped_total`).
//! Each delivered record carries how many records the subscriber had lost
//! before it, so the stream can say `{"lost": N}` at the right place.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use serde::Serialize;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::FlowRecord;
use crate::flow_filter::FlowFilter;

/// Queue length of a subscriber when the client does not ask for one.
pub const DEFAULT_QUEUE: usize = 1024;
/// The largest queue a client may ask for.
pub const MAX_QUEUE: usize = 65_536;

/// One record for a subscriber.
#[derive(Debug)]
pub struct Delivery {
    /// Records this subscriber had lost when this one was queued.
    pub lost_before: u64,
    /// The record.
    pub record: Arc<FlowRecord>,
}

/// The receiving end of a subscription.
#[derive(Debug)]
pub struct Subscription {
    /// Subscriber id (as in `/stats`).
    pub id: u64,
    /// Stored records that matched when it subscribed, oldest first.
    pub backlog: Vec<FlowRecord>,
    /// New records.
    pub rx: mpsc::Receiver<Delivery>,
    /// Records lost so far (the queue was full).
    pub lost: Arc<AtomicU64>,
}

struct Subscriber {
    id: u64,
    filter: FlowFilter,
    tx: mpsc::Sender<Delivery>,
    lost: Arc<AtomicU64>,
}

/// Every live subscriber, and the records they lost.
#[derive(Default)]
pub struct Subscribers {
    next_id: u64,
    list: Vec<Subscriber>,
    lost_total: u64,
}

/// What `/stats` shows about subscribers.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Records lost by every subscriber so far, gone ones included.
    pub lost_total: u64,
    /// The live ones.
    pub subscribers: Vec<SubscriberStats>,
}

/// One live subscriber.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStats {
    /// Its id.
    pub id: u64,
    /// Records queued, not yet read.
    pub queued: usize,
    /// Queue capacity.
    pub queue: usize,
    /// Records it lost.
    pub lost: u64,
}

impl Subscribers {
    /// Registers a subscriber with a queue of `queue` (clamped to
    /// 1..=[`MAX_QUEUE`]) records.
    pub fn add(
        &mut self,
        filter: FlowFilter,
        queue: usize,
        backlog: Vec<FlowRecord>,
    ) -> Subscription {
        self.next_id += 1;
        let (tx, rx) = mpsc::channel(queue.clamp(1, MAX_QUEUE));
        let lost = Arc::new(AtomicU64::new(0));
        self.list.push(Subscriber {
            id: self.next_id,
            filter,
            tx,
            lost: lost.clone(),
        });
        Subscription {
            id: self.next_id,
            backlog,
            rx,
            lost,
        }
    }

    /// Offers `record` to every subscriber whose filter it passes; never
    /// waits. Subscribers whose receiver is gone are removed.
    pub fn publish(&mut self, record: &FlowRecord) {
        if self.list.is_empty() {
            return;
        }
        let mut shared: Option<Arc<FlowRecord>> = None;
        let mut lost_now = 0;
        self.list.retain(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !s.filter.matches(record) {
                return true;
            }
            let record = shared
                .get_or_insert_with(|| Arc::new(record.clone()))
                .clone();
            let lost_before = s.lost.load(Ordering::Relaxed);
            match s.tx.try_send(Delivery {
                lost_before,
                record,
            }) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    lost_now += 1;
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
        self.lost_total += lost_now;
    }

    /// Live subscribers and the total lost.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            lost_total: self.lost_total,
            subscribers: self
                .list
                .iter()
                .filter(|s| !s.tx.is_closed())
                .map(|s| SubscriberStats {
                    id: s.id,
                    queued: s.tx.max_capacity() - s.tx.capacity(),
                    queue: s.tx.max_capacity(),
                    lost: s.lost.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::flow_filter::FlowFilter;
    use crate::flows::{ConnInfo, Direction, FlowLog};
    use crate::registry::ObjectRef;

    fn info(ns: &str) -> ConnInfo {
        ConnInfo::new(
            Direction::Outbound,
            ObjectRef {
                namespace: ns.into(),
                name: "client".into(),
            },
        )
    }

    fn all() -> FlowFilter {
        FlowFilter {
            last: 100,
            ..FlowFilter::default()
        }
    }

    #[test]
    fn a_subscriber_gets_its_backlog_then_new_matching_records_without_gap_or_overlap() {
        let log = FlowLog::new(10);
        log.failed(1, &info("demo"), "x".into());
        let mut sub = log.subscribe(
            FlowFilter {
                namespace: Some("demo".into()),
                ..all()
            },
            8,
        );
        log.failed(2, &info("other"), "x".into());
        log.failed(3, &info("demo"), "x".into());
        assert_eq!(sub.backlog.iter().map(|r| r.conn).collect::<Vec<_>>(), [1]);
        let d = sub.rx.try_recv().unwrap();
        assert_eq!((d.record.conn, d.lost_before), (3, 0));
        assert!(sub.rx.try_recv().is_err());
    }

    #[test]
    fn a_stalled_subscriber_loses_records_and_the_loss_is_counted_not_waited_for() {
        let log = FlowLog::new(10);
        let mut sub = log.subscribe(all(), 2);
        for conn in 0..5 {
            log.failed(conn, &info("demo"), "x".into());
        }
        let stats = log.subscriber_stats();
        assert_eq!(stats.lost_total, 3);
        assert_eq!(
            (stats.subscribers[0].lost, stats.subscribers[0].queued),
            (3, 2)
        );
        sub.rx.try_recv().unwrap();
        sub.rx.try_recv().unwrap();
        log.failed(9, &info("demo"), "x".into());
        let d = sub.rx.try_recv().unwrap();
        assert_eq!((d.record.conn, d.lost_before), (9, 3));
    }

    #[test]
    fn a_gone_subscriber_is_removed_and_its_losses_stay_in_the_total() {
        let log = FlowLog::new(10);
        let sub = log.subscribe(all(), 1);
        log.failed(1, &info("demo"), "x".into());
        log.failed(2, &info("demo"), "x".into());
        drop(sub);
        log.failed(3, &info("demo"), "x".into());
        let stats = log.subscriber_stats();
        assert!(stats.subscribers.is_empty());
        assert_eq!(stats.lost_total, 1);
    }
}
