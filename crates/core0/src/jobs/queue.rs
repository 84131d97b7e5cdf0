//! Named FIFO queues: jobs of one queue run one at a time, in arrival order.
//!
//! A job takes its place in line when it is submitted (synchronously, so arrival order is
//! kept), then waits for its [`Turn`]. The turn passes on when the [`TurnGuard`] is dropped; a job
//! killed while waiting drops its receiver and is skipped. An empty queue is removed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

#[derive(Default)]
struct Line {
    waiting: VecDeque<oneshot::Sender<()>>,
}

/// Every named queue.
#[derive(Default)]
pub struct Queues {
    lines: Arc<Mutex<HashMap<String, Line>>>,
}

/// A place in a queue.
pub enum Turn {
    /// The queue was idle: the job may run now.
    Now(TurnGuard),
    /// The job runs when `rx` fires.
    Later(oneshot::Receiver<()>, TurnGuard),
}

/// Holds a queue's turn; dropping it lets the next waiting job run.
pub struct TurnGuard {
    lines: Arc<Mutex<HashMap<String, Line>>>,
    name: String,
    holds: bool,
}

fn lock(m: &Mutex<HashMap<String, Line>>) -> MutexGuard<'_, HashMap<String, Line>> {
    // The map stays consistent even if a holder panicked: every critical section is a single
    // insert/remove/pop.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Queues {
    /// Enters queue `name`.
    pub fn enter(&self, name: &str) -> Turn {
        let mut lines = lock(&self.lines);
        match lines.get_mut(name) {
            Some(line) => {
                let (tx, rx) = oneshot::channel();
                line.waiting.push_back(tx);
                Turn::Later(
                    rx,
                    TurnGuard {
                        lines: self.lines.clone(),
                        name: name.to_string(),
                        holds: false,
                    },
                )
            }
            None => {
                lines.insert(name.to_string(), Line::default());
                Turn::Now(TurnGuard {
                    lines: self.lines.clone(),
                    name: name.to_string(),
                    holds: true,
                })
            }
        }
    }

    /// Number of queues that exist (a queue exists while a job of it runs or waits).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.lines).len()
    }

    /// Whether no queue exists.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TurnGuard {
    /// Marks that this guard now holds the turn (the job's `Later` receiver fired).
    pub fn acquired(&mut self) {
        self.holds = true;
    }
}

/// Leaves a queue without running (the job was killed while it waited). A turn that reached
/// this waiter meanwhile is passed on to the next one.
pub fn give_up(rx: oneshot::Receiver<()>, guard: TurnGuard) {
    give_up_then(rx, guard, || {});
}

/// [`give_up`], running `between` after the receiver is closed and before it is checked (where
/// a holder handing the turn on may run).
fn give_up_then(mut rx: oneshot::Receiver<()>, mut guard: TurnGuard, between: impl FnOnce()) {
    // Close first: from now on a holder handing the turn on finds this waiter gone and skips
    // it; a turn sent before is still in the channel and is taken here. (Checking an open
    // receiver could miss a turn sent just after the check, which would then be lost with
    // the receiver and stall the queue.)
    rx.close();
    between();
    if rx.try_recv().is_ok() {
        guard.acquired();
    }
    drop(guard);
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        if !self.holds {
            // A waiter that never got its turn: its dropped receiver makes the holder skip it.
            return;
        }
        let mut lines = lock(&self.lines);
        let Some(line) = lines.get_mut(&self.name) else {
            return;
        };
        while let Some(next) = line.waiting.pop_front() {
            if next.send(()).is_ok() {
                return;
            }
        }
        lines.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_skips_dropped_waiters_and_removes_empty_queue() {
        let q = Queues::default();
        let Turn::Now(first) = q.enter("a") else {
            panic!("idle queue must run at once")
        };
        let Turn::Later(rx2, g2) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        let Turn::Later(rx3, mut g3) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        drop((rx2, g2));
        drop(first);
        rx3.await.expect("third gets the turn");
        g3.acquired();
        assert_eq!(q.len(), 1);
        drop(g3);
        assert!(q.is_empty());
    }

    #[test]
    fn give_up_passes_a_turn_that_arrived_before() {
        let q = Queues::default();
        let Turn::Now(first) = q.enter("a") else {
            panic!("idle queue must run at once")
        };
        let Turn::Later(rx2, g2) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        let Turn::Later(mut rx3, _g3) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        drop(first); // the turn goes to the second waiter...
        give_up(rx2, g2); // ...which was killed: the third gets it
        assert!(rx3.try_recv().is_ok());
    }

    #[test]
    fn give_up_while_the_holder_hands_on_never_loses_the_turn() {
        let q = Queues::default();
        let Turn::Now(first) = q.enter("a") else {
            panic!("idle queue must run at once")
        };
        let Turn::Later(rx2, g2) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        let Turn::Later(mut rx3, _g3) = q.enter("a") else {
            panic!("busy queue must wait")
        };
        // The holder ends between the waiter's decision to leave and its last look.
        give_up_then(rx2, g2, || drop(first));
        assert!(rx3.try_recv().is_ok(), "the turn was lost");
    }
}
