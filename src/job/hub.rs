//! A progress hub: one publisher, any number of subscribers that come and go, each with a
//! bounded queue. A slow subscriber loses its oldest events (and is told how many); it never
//! blocks the publisher or the other subscribers. The last event (the job's end) is kept, so a
//! subscriber that arrives late still gets it.
//!
//! Every check-and-act (subscribe vs. close, unsubscribe vs. publish) happens under the hub's one
//! lock; the loom models in `tests/loom_job.rs` check them.

use std::collections::VecDeque;

use crate::sync::{Arc, Condvar, Mutex};

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Received<E> {
    /// The next event.
    Event(E),
    /// This many events were dropped before the next one because the subscriber fell behind.
    Lagged(u64),
}

struct Queue<E> {
    state: Mutex<QueueState<E>>,
    ready: Condvar,
}

struct QueueState<E> {
    events: VecDeque<E>,
    dropped: u64,
    /// No event will follow the ones queued (the hub closed).
    closed: bool,
}

struct HubState<E> {
    subscribers: Vec<(u64, Arc<Queue<E>>)>,
    next_id: u64,
    /// The closing event, once published.
    last: Option<E>,
    capacity: usize,
}

/// Why [`Subscription::recv_timeout`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvTimeoutError {
    /// Nothing came within the timeout; more may follow.
    #[error("no event within the timeout")]
    Timeout,
    /// The closing event has been received: nothing follows.
    #[error("the progress stream has ended")]
    Closed,
}

/// The publishing side. Cloning it shares the hub.
pub struct ProgressHub<E> {
    state: Arc<Mutex<HubState<E>>>,
}

impl<E> std::fmt::Debug for ProgressHub<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressHub").finish_non_exhaustive()
    }
}

impl<E> Clone for ProgressHub<E> {
    fn clone(&self) -> Self {
        ProgressHub {
            state: Arc::clone(&self.state),
        }
    }
}

impl<E: Clone> ProgressHub<E> {
    /// A hub whose subscribers each queue at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        ProgressHub {
            state: Arc::new(Mutex::new(HubState {
                subscribers: Vec::new(),
                next_id: 0,
                last: None,
                capacity: capacity.max(1),
            })),
        }
    }

    /// Sends `event` to every current subscriber. Ignored once the hub is closed.
    pub fn publish(&self, event: E) {
        let hub = self.state.lock();
        if hub.last.is_some() {
            return;
        }
        for (_, q) in &hub.subscribers {
            q.push(event.clone(), hub.capacity, false);
        }
    }

    /// Sends the closing `event` to every subscriber and keeps it for later ones; nothing is
    /// published after it. A second close is ignored.
    pub fn close(&self, event: E) {
        let mut hub = self.state.lock();
        if hub.last.is_some() {
            return;
        }
        for (_, q) in &hub.subscribers {
            q.push(event.clone(), hub.capacity, true);
        }
        hub.last = Some(event);
    }

    /// Whether the closing event was published.
    pub fn is_closed(&self) -> bool {
        self.state.lock().last.is_some()
    }

    /// How many subscribers are attached.
    pub fn subscribers(&self) -> usize {
        self.state.lock().subscribers.len()
    }

    /// A new subscriber. On a closed hub it receives the closing event and then the end.
    pub fn subscribe(&self) -> Subscription<E> {
        let mut hub = self.state.lock();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                events: VecDeque::new(),
                dropped: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let id = hub.next_id;
        hub.next_id += 1;
        match hub.last.clone() {
            Some(last) => queue.push(last, 1, true),
            None => hub.subscribers.push((id, Arc::clone(&queue))),
        }
        Subscription {
            hub: Arc::clone(&self.state),
            queue,
            id,
        }
    }
}

impl<E> Queue<E> {
    fn push(&self, event: E, capacity: usize, close: bool) {
        let mut q = self.state.lock();
        if q.events.len() >= capacity {
            q.events.pop_front();
            q.dropped += 1;
        }
        q.events.push_back(event);
        q.closed |= close;
        drop(q);
        self.ready.notify_one();
    }
}

/// The receiving side of one subscriber. Dropping it unsubscribes.
pub struct Subscription<E> {
    hub: Arc<Mutex<HubState<E>>>,
    queue: Arc<Queue<E>>,
    id: u64,
}

impl<E> Subscription<E> {
    fn take(q: &mut QueueState<E>) -> Option<Received<E>> {
        if q.dropped > 0 {
            let n = std::mem::take(&mut q.dropped);
            return Some(Received::Lagged(n));
        }
        q.events.pop_front().map(Received::Event)
    }

    /// The next event, waiting for it; `None` once the closing event has been received.
    pub fn recv(&self) -> Option<Received<E>> {
        let mut q = self.queue.state.lock();
        loop {
            if let Some(r) = Self::take(&mut q) {
                return Some(r);
            }
            if q.closed {
                return None;
            }
            self.queue.ready.wait(&mut q);
        }
    }

    /// Like [`recv`](Subscription::recv), giving up after `timeout`:
    /// [`RecvTimeoutError::Timeout`] when nothing came, [`RecvTimeoutError::Closed`] once the
    /// closing event has been received.
    pub fn recv_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Received<E>, RecvTimeoutError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.queue.state.lock();
        loop {
            if let Some(r) = Self::take(&mut q) {
                return Ok(r);
            }
            if q.closed {
                return Err(RecvTimeoutError::Closed);
            }
            if self.queue.ready.wait_until(&mut q, deadline).timed_out() {
                return Self::take(&mut q).ok_or(RecvTimeoutError::Timeout);
            }
        }
    }

    /// The next event if one is queued, without waiting.
    pub fn try_recv(&self) -> Option<Received<E>> {
        Self::take(&mut self.queue.state.lock())
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        let id = self.id;
        self.hub.lock().subscribers.retain(|(s, _)| *s != id);
    }
}

impl<E> std::fmt::Debug for Subscription<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}
