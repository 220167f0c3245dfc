//! Read deadlines on the paths hyper serves, where hyper itself has none: a request body that
//! stops arriving ([`Body`], `server.body_timeout_ms`) and the answer it gets (408, then the
//! connection closes). The lean HTTP/1.1 loop ([`crate::http1`]) keeps its own deadlines.
//!
//! The timer is armed only while a read waits: a body that arrives with its head (the usual
//! case) never touches it.

use crate::app::App;
use crate::metrics::Refusal;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};
use hyper::{Response, StatusCode, header};
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Sleep;

/// The error a body gives when its next bytes did not come in time.
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body stalled (server.body_timeout_ms)")
    }
}

impl std::error::Error for BodyTimedOut {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body whose every wait for more bytes ends after `stall`.
pub struct Body<B> {
    inner: B,
    stall: Duration,
    /// Made at the first wait (a body that is already there never needs one), then moved.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current wait.
    armed: bool,
}

impl<B> Body<B> {
    pub fn new(inner: B, stall: Duration) -> Body<B> {
        Body {
            inner,
            stall,
            timer: None,
            armed: false,
        }
    }
}

impl<B> hyper::body::Body for Body<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let stall = this.stall;
                let timer = match &mut this.timer {
                    Some(t) if this.armed => t,
                    Some(t) => {
                        t.as_mut().reset(tokio::time::Instant::now() + stall);
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(stall))),
                };
                this.armed = true;
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `server.body_timeout_ms`.
pub fn body_stall(app: &App) -> Duration {
    Duration::from_millis(app.config.server.body_timeout_ms)
}

/// Whether a body error (as `http_body_util::Limited` or [`Body`] give it) is a stall.
pub fn is_timeout(e: &BoxError) -> bool {
    e.is::<BodyTimedOut>()
}

/// The answer to a request whose body stalled: 408 with `connection: close` (the rest of the
/// body will never be read), counted as a forced close by a deadline.
pub fn body_timed_out(app: &App) -> Response<Full<Bytes>> {
    app.metrics.refused(Refusal::Timeout);
    tracing::debug!("request body stalled; answering 408");
    let mut r = crate::respond::error_response(
        StatusCode::REQUEST_TIMEOUT,
        "request body not received in time",
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body fed by a channel: each message is a frame; the sender's drop ends it.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl hyper::body::Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_moving_body_is_read_and_a_stalled_one_times_out() {
        let stall = Duration::from_millis(80);
        // Five pieces 30 ms apart (150 ms in all, longer than the stall): read whole.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                tx.send(Bytes::from_static(b"ab")).await.unwrap();
            }
        });
        let body = Body::new(Fed(rx), stall).collect().await.unwrap();
        assert_eq!(body.to_bytes(), "ababababab");
        feeder.await.unwrap();

        // One piece, then nothing: the stall ends the read.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(Bytes::from_static(b"ab")).await.unwrap();
        let start = tokio::time::Instant::now();
        let e = Body::new(Fed(rx), stall).collect().await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(start.elapsed() >= stall);
        drop(tx);
    }
}
