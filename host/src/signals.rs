//! Process signals for `postern serve`: SIGTERM and SIGINT are taken by a thread of their own,
//! not by the async runtime, so a stop request is heard even when every runtime worker is busy
//! in a task that does not yield; that thread also enforces the hard deadline of a stop.
//!
//! Why not tokio's signal streams: they are read by the runtime's I/O driver, which only runs
//! when a worker is free. A server whose workers are all stuck would then never stop.

use std::time::Duration;

use tokio::sync::watch;

/// Extra time past the grace period before the process is ended regardless, so a graceful stop
/// that is merely slow (a flush at the deadline) is not cut short.
const HARD_MARGIN: Duration = Duration::from_secs(2);

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started after it: call it
/// before the runtime is built), and starts the thread that waits for them. The receiver turns
/// true at the first signal. `grace` after that signal (plus a margin) the process exits with
/// status 1 wherever it is, after `cleanup`; a second signal exits at once.
pub fn install(grace: Duration, cleanup: impl Fn() + Send + 'static) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    // SAFETY: plain libc signal-set calls on a local, initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let wait = move || {
                let mut signal = 0;
                // SAFETY: `set` is a valid signal set; sigwait writes the signal number.
                unsafe { libc::sigwait(&set, &mut signal) };
                signal
            };
            let first = wait();
            tracing::info!(signal = first, "stop requested");
            let _ = tx.send(true);
            // Whichever comes first: a second signal, or the hard deadline.
            let (second_tx, second_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                wait();
                let _ = second_tx.send(());
            });
            let why = match second_rx.recv_timeout(grace + HARD_MARGIN) {
                Ok(()) => "second signal",
                Err(_) => "deadline",
            };
            tracing::warn!(why, "stopping now: sessions did not end in time");
            cleanup();
            std::process::exit(1);
        })
        .expect("spawn the signal thread");
    rx
}
