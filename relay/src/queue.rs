//! The queue between one client's merge and its gRPC response stream, bounded in flows
//! (not in batches, whose sizes vary): a following client that reads too slowly makes
//! [`QueueSender::try_send`] fail, so the merge drops and counts instead of waiting; a
//! one-shot query waits for room with [`QueueSender::send`].

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use futures::Stream;
use tokio::sync::{mpsc, Notify};

use crate::wire::RawResponse;

pub type Batch = Vec<RawResponse>;

struct Shared {
    flows: AtomicUsize,
    space: Notify,
    closed: AtomicBool,
}

pub struct QueueSender {
    tx: mpsc::UnboundedSender<Batch>,
    shared: Arc<Shared>,
    limit: usize,
}

pub struct QueueReceiver {
    rx: mpsc::UnboundedReceiver<Batch>,
    shared: Arc<Shared>,
}

/// A queue holding at most `limit` responses (a batch larger than `limit` is accepted
/// into an empty queue).
pub fn queue(limit: usize) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        flows: AtomicUsize::new(0),
        space: Notify::new(),
        closed: AtomicBool::new(false),
    });
    (
        QueueSender {
            tx,
            shared: shared.clone(),
            limit: limit.max(1),
        },
        QueueReceiver { rx, shared },
    )
}

/// Why a batch was not queued.
#[derive(Debug)]
pub enum SendError {
    /// No room; the batch is handed back.
    Full(Batch),
    /// The client went away.
    Closed,
}

impl QueueSender {
    fn fits(&self, n: usize) -> bool {
        let queued = self.shared.flows.load(Ordering::Acquire);
        queued == 0 || queued + n <= self.limit
    }

    fn push(&self, batch: Batch) -> Result<(), SendError> {
        let n = batch.len();
        self.shared.flows.fetch_add(n, Ordering::AcqRel);
        self.tx.send(batch).map_err(|_| SendError::Closed)
    }

    pub fn try_send(&self, batch: Batch) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        if batch.is_empty() {
            return Ok(());
        }
        if !self.fits(batch.len()) {
            return Err(SendError::Full(batch));
        }
        self.push(batch)
    }

    /// Waits for room, then queues.
    pub async fn send(&self, batch: Batch) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        loop {
            if self.is_closed() {
                return Err(SendError::Closed);
            }
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.fits(batch.len()) {
                return self.push(batch);
            }
            notified.await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Resolves when the client went away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Responses queued and not yet taken by the response stream.
    pub fn queued(&self) -> usize {
        self.shared.flows.load(Ordering::Acquire)
    }
}

impl QueueReceiver {
    /// The next batch (`None`: the merge ended).
    pub fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                self.shared.flows.fetch_sub(b.len(), Ordering::AcqRel);
                self.shared.space.notify_waiters();
                Poll::Ready(Some(b))
            }
            other => other,
        }
    }

    /// One response at a time, as the Observer API streams them.
    pub fn into_responses(self) -> Responses {
        Responses {
            rx: self,
            current: Vec::new().into_iter(),
        }
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.space.notify_waiters();
    }
}

impl Stream for QueueReceiver {
    type Item = Batch;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        self.get_mut().poll_batch(cx)
    }
}

/// A client's responses, flattened from the queued batches.
pub struct Responses {
    rx: QueueReceiver,
    current: std::vec::IntoIter<RawResponse>,
}

impl Stream for Responses {
    type Item = Result<RawResponse, tonic::Status>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.current.next() {
                return Poll::Ready(Some(Ok(r)));
            }
            match this.rx.poll_batch(cx) {
                Poll::Ready(Some(b)) => this.current = b.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn batch(n: usize) -> Batch {
        (0..n).map(|_| RawResponse::default()).collect()
    }

    #[tokio::test]
    async fn full_queue_refuses_and_frees_room_as_the_client_reads() {
        let (tx, mut rx) = queue(10);
        tx.try_send(batch(6)).expect("room");
        assert!(matches!(tx.try_send(batch(6)), Err(SendError::Full(b)) if b.len() == 6));
        tx.try_send(batch(4)).expect("room");
        assert_eq!(tx.queued(), 10);
        assert_eq!(rx.next().await.map(|b| b.len()), Some(6));
        tx.try_send(batch(6)).expect("room again");
        let waiting = tokio::spawn(async move {
            tx.send(batch(5)).await.expect("sent once there is room");
            tx
        });
        tokio::task::yield_now().await;
        assert_eq!(rx.next().await.map(|b| b.len()), Some(4));
        assert_eq!(rx.next().await.map(|b| b.len()), Some(6));
        let tx = waiting.await.expect("joined");
        assert_eq!(rx.next().await.map(|b| b.len()), Some(5));
        drop(rx);
        assert!(matches!(tx.send(batch(1)).await, Err(SendError::Closed)));
    }

    #[tokio::test]
    async fn a_waiting_sender_learns_the_client_left() {
        let (tx, rx) = queue(1);
        tx.try_send(batch(1)).expect("room");
        let waiting = tokio::spawn(async move { tx.send(batch(1)).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert!(matches!(
            waiting.await.expect("joined"),
            Err(SendError::Closed)
        ));
    }
}
