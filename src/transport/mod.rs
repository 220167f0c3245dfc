//! Transports drive a transport-neutral [`Session`](crate::session::Session) over a wire.
//! Each owns its framing and flow control, and nothing else.

pub mod longpoll;
pub mod websocket;
