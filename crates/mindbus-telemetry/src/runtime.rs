//! The crate's own background Tokio runtime.
//!
//! OTLP exports (tonic and hyper need a Tokio reactor) and the Prometheus listener
//! run on one current-thread runtime driven by a dedicated thread. The SDK's batch
//! processors hand each batch to it and wait on their own threads, so exporting
//! works the same whatever runtime the application uses — none, multi-thread or
//! current-thread — and shutting down never needs the application's runtime to make
//! progress (no deadlock when the guard drops inside `#[tokio::main(flavor =
//! "current_thread")]`).

use std::sync::Mutex;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A current-thread runtime running on its own thread until [`stop`](Self::stop).
#[derive(Debug)]
pub(crate) struct BackgroundRuntime {
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

impl BackgroundRuntime {
    pub(crate) fn start() -> std::io::Result<BackgroundRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("mindbus-telemetry")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("mindbus-telemetry".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    // Either a stop request or the sender being dropped ends the loop.
                    let _ = stop_rx.await;
                });
                // Tasks still running (an export to a blackholed collector) are
                // cancelled; their callers see a cancelled export.
                runtime.shutdown_timeout(Duration::from_millis(100));
                let _ = done_tx.send(());
            })?;
        Ok(BackgroundRuntime {
            handle,
            stop: Mutex::new(Some(stop_tx)),
            done: Mutex::new(Some(done_rx)),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the runtime and waits for its thread until `deadline` (at least a
    /// short grace period). Idempotent; never blocks past the deadline by more than
    /// the grace period.
    pub(crate) fn stop(&self, deadline: Instant) {
        if let Some(stop) = self.stop.lock().ok().and_then(|mut stop| stop.take()) {
            let _ = stop.send(());
        }
        let done = self.done.lock().ok().and_then(|mut done| done.take());
        if let Some(done) = done {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(200));
            let _ = done.recv_timeout(wait);
        }
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        // Ask the thread to stop; it cleans up on its own.
        if let Some(stop) = self.stop.get_mut().ok().and_then(Option::take) {
            let _ = stop.send(());
        }
    }
}
