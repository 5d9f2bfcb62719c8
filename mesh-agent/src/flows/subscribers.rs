//! Live flow subscribers: each has a filter and a bounded queue. Records
//! are offered with `try_send` under the flow log's ring lock, so
//! publishing costs a filter check and, for a match, an `Arc` clone; it
//! never waits. A full queue (a slow or stalled reader) loses the record:
//! counted for that subscriber and in a total that outlives it
//! (`/stats`, `heddle status`, `heddle_flow_subscriber_dropped_total`).
//! Each delivered record carries how many records the subscriber had lost
//! before it, so the stream can say `{"lost": N}` at the right place.
//!
//! What subscribers can hold is bounded: at most [`MAX_SUBSCRIBERS`] live
//! at once, each queue at most [`MAX_QUEUE`] records, and all queues
//! together at most [`MAX_QUEUED_TOTAL`] records. A subscription beyond
//! either limit is refused ([`SubscribeError`]; the admin API answers 503).
//! Subscribers whose reader is gone are pruned before counting, so a client
//! that left frees its place at once.

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
/// The most subscribers live at once: a handful of operators' `heddle flows
/// --follow` and a collector or two, with room to spare.
pub const MAX_SUBSCRIBERS: usize = 32;
/// The most records all subscribers' queues may hold together (two
/// maximal queues, or every subscriber at [`DEFAULT_QUEUE`] with room to
/// spare): with records of roughly 600 bytes, under 80 MiB if every
/// subscriber stalls with a full queue.
pub const MAX_QUEUED_TOTAL: usize = 2 * MAX_QUEUE;

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    /// [`MAX_SUBSCRIBERS`] streams are already following.
    #[error("too many flow subscribers: {MAX_SUBSCRIBERS} streams are already following (the most the agent serves at once); close one or retry later")]
    TooMany,
    /// The new queue does not fit in [`MAX_QUEUED_TOTAL`].
    #[error("flow stream queues are full: live subscribers have {held} of {MAX_QUEUED_TOTAL} queued records and queue={asked} does not fit; ask for a smaller queue or retry later")]
    QueueBudget {
        /// Queue capacity held by live subscribers.
        held: usize,
        /// The queue asked for.
        asked: usize,
    },
}

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
    /// 1..=[`MAX_QUEUE`]) records, unless that would pass
    /// [`MAX_SUBSCRIBERS`] or [`MAX_QUEUED_TOTAL`]; its backlog is taken
    /// by `backlog` only once it is admitted.
    pub fn add(
        &mut self,
        filter: FlowFilter,
        queue: usize,
        backlog: impl FnOnce(&FlowFilter) -> Vec<FlowRecord>,
    ) -> Result<Subscription, SubscribeError> {
        let queue = queue.clamp(1, MAX_QUEUE);
        self.list.retain(|s| !s.tx.is_closed());
        if self.list.len() >= MAX_SUBSCRIBERS {
            return Err(SubscribeError::TooMany);
        }
        let held: usize = self.list.iter().map(|s| s.tx.max_capacity()).sum();
        if held + queue > MAX_QUEUED_TOTAL {
            return Err(SubscribeError::QueueBudget { held, asked: queue });
        }
        let backlog = backlog(&filter);
        self.next_id += 1;
        let (tx, rx) = mpsc::channel(queue);
        let lost = Arc::new(AtomicU64::new(0));
        self.list.push(Subscriber { id: self.next_id, filter, tx, lost: lost.clone() });
        Ok(Subscription { id: self.next_id, backlog, rx, lost })
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
            let record = shared.get_or_insert_with(|| Arc::new(record.clone())).clone();
            let lost_before = s.lost.load(Ordering::Relaxed);
            match s.tx.try_send(Delivery { lost_before, record }) {
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
    use super::{SubscribeError, DEFAULT_QUEUE, MAX_QUEUE, MAX_SUBSCRIBERS};
    use crate::flow_filter::FlowFilter;
    use crate::flows::{ConnInfo, Direction, FlowLog};
    use crate::registry::ObjectRef;

    fn info(ns: &str) -> ConnInfo {
        ConnInfo::new(Direction::Outbound, ObjectRef { namespace: ns.into(), name: "client".into() })
    }

    fn all() -> FlowFilter {
        FlowFilter { last: 100, ..FlowFilter::default() }
    }

    #[test]
    fn a_subscriber_gets_its_backlog_then_new_matching_records_without_gap_or_overlap() {
        let log = FlowLog::new(10);
        log.failed(1, &info("demo"), "x".into());
        let mut sub = log.subscribe(FlowFilter { namespace: Some("demo".into()), ..all() }, 8).unwrap();
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
        let mut sub = log.subscribe(all(), 2).unwrap();
        for conn in 0..5 {
            log.failed(conn, &info("demo"), "x".into());
        }
        let stats = log.subscriber_stats();
        assert_eq!(stats.lost_total, 3);
        assert_eq!((stats.subscribers[0].lost, stats.subscribers[0].queued), (3, 2));
        sub.rx.try_recv().unwrap();
        sub.rx.try_recv().unwrap();
        log.failed(9, &info("demo"), "x".into());
        let d = sub.rx.try_recv().unwrap();
        assert_eq!((d.record.conn, d.lost_before), (9, 3));
    }

    #[test]
    fn a_gone_subscriber_is_removed_and_its_losses_stay_in_the_total() {
        let log = FlowLog::new(10);
        let sub = log.subscribe(all(), 1).unwrap();
        log.failed(1, &info("demo"), "x".into());
        log.failed(2, &info("demo"), "x".into());
        drop(sub);
        log.failed(3, &info("demo"), "x".into());
        let stats = log.subscriber_stats();
        assert!(stats.subscribers.is_empty());
        assert_eq!(stats.lost_total, 1);
    }

    #[test]
    fn subscribers_beyond_the_cap_are_refused_until_one_leaves() {
        let log = FlowLog::new(10);
        let mut subs: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| log.subscribe(all(), DEFAULT_QUEUE).unwrap()).collect();
        assert_eq!(log.subscribe(all(), DEFAULT_QUEUE).unwrap_err(), SubscribeError::TooMany);
        subs.pop();
        assert!(log.subscribe(all(), DEFAULT_QUEUE).is_ok());
    }

    #[test]
    fn queues_beyond_the_total_budget_are_refused() {
        let log = FlowLog::new(10);
        let _a = log.subscribe(all(), MAX_QUEUE).unwrap();
        let _b = log.subscribe(all(), MAX_QUEUE).unwrap();
        assert_eq!(log.subscribe(all(), 1).unwrap_err(), SubscribeError::QueueBudget { held: 2 * MAX_QUEUE, asked: 1 });
        assert_eq!(log.subscriber_stats().subscribers.len(), 2);
    }
}
