//! systemd integration, all through the environment variables systemd defines, so nothing here
//! needs configuring and every function does nothing outside systemd:
//!
//! - **Socket activation** (`LISTEN_FDS`, `LISTEN_PID`; sd_listen_fds(3)): [`take_listeners`]
//!   takes the listening sockets systemd passed from fd 3 on. `pushgate.socket` keeps the socket
//!   open across `systemctl restart pushgate`, so connections arriving while the process is
//!   replaced wait in the kernel's accept queue instead of being refused.
//! - **Readiness** (`NOTIFY_SOCKET`; sd_notify(3)): [`notify_ready`] sends `READY=1` once the
//!   listeners are bound and the broker is ready (for `Type=notify`); [`notify_stopping`] sends
//!   `STOPPING=1` when the drain begins.
//! - **Watchdog** (`WATCHDOG_USEC`, `WATCHDOG_PID`): [`watchdog`] sends `WATCHDOG=1` at half the
//!   interval `WatchdogSec=` asks for, from a task on the server's runtime, so a wedged runtime
//!   stops the pings and systemd restarts the service.
//!
//! The protocol work is done by two small, widely used crates rather than by hand: `listenfd`
//! (validates that each fd is a TCP listening socket, marks it close-on-exec, checks
//! `LISTEN_PID`) and `sd-notify` (the datagram protocol, abstract socket names, the watchdog
//! variables). Both keep `unsafe` out of this crate.

use std::io;
use std::time::Duration;

/// Takes the TCP listening sockets systemd passed (`LISTEN_FDS`), in order, set non-blocking
/// for tokio. Empty when the process was not socket-activated (no `LISTEN_FDS`, or a
/// `LISTEN_PID` naming another process).
///
/// Call it before any other thread exists: `listenfd` removes `LISTEN_FDS` and `LISTEN_PID`
/// from the environment (so child processes do not inherit them), which is only sound while
/// the process is single-threaded. An fd that is not a TCP listening socket is an error.
pub fn take_listeners() -> io::Result<Vec<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        let fd = 3 + i;
        let listener = fds
            .take_tcp_listener(i)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("LISTEN_FDS: fd {fd} is not usable: {e}"))
            })?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("LISTEN_FDS: fd {fd} is gone"),
                )
            })?;
        listener.set_nonblocking(true)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Tells systemd the service is ready (`READY=1`) with a one-line `STATUS=`.
pub fn notify_ready(status: &str) {
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd the service is stopping (`STOPPING=1`): the drain has begun.
pub fn notify_stopping() {
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends; `None` when no watchdog is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Sends `WATCHDOG=1` every `interval`, forever. Spawn it on the server's runtime; it ends
/// with the runtime.
pub async fn watchdog(interval: Duration) {
    // The first ping one interval in, not at once: READY=1 (sent as soon as the broker is
    // ready) comes first, as systemd and tests/systemd.rs expect.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send(&[sd_notify::NotifyState::Watchdog]);
    }
}

fn send(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
