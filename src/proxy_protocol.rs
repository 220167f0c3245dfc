//! The PROXY protocol header at the start of an edge connection (`tls.proxy_protocol`), as a
//! proxy in front sends it (nginx's `stream` module with `proxy_protocol on` sends version 1;
//! HAProxy may send version 2): who the client is, when pushgate's edge sits behind a TCP
//! proxy that routes by SNI.
//!
//! Parsing is the `ppp` crate's (versions 1 and 2, partial input told apart from invalid
//! input); this module reads just enough of the socket for it, bounded by
//! [`MAX_HEADER_BYTES`], and hands back whatever followed the header (the start of the TLS
//! handshake) so that nothing is lost. The caller bounds the time it takes.

use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header read: 536 bytes, the buffer the protocol's specification says a receiver
/// needs for any version 1 header (at most 107 bytes) and a version 2 header with addresses and
/// a few TLVs. A longer version 2 header (large TLVs, which nginx never sends) is refused.
pub const MAX_HEADER_BYTES: usize = 536;

/// Whom a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address and port (`PROXY TCP4 ...`, a version 2 `PROXY` over IPv4/IPv6).
    Client(SocketAddr),
    /// The proxy speaking for itself (version 2 `LOCAL`, a health check) or an address the
    /// header does not give (`PROXY UNKNOWN`, version 2 `UNSPEC` or UNIX): the socket's own
    /// peer stands, as the specification asks.
    Local,
}

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the proxy protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection ended before a complete proxy protocol header")]
    Closed,
    #[error("not a proxy protocol header: {0}")]
    Invalid(String),
    #[error("proxy protocol header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
}

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: read on.
    Incomplete,
    /// A header of `len` bytes.
    Header {
        source: Source,
        len: usize,
    },
    Invalid(String),
}

/// Parses the start of a connection (pure: `ppp`'s parser and the choice of address).
pub fn parse(buf: &[u8]) -> Parsed {
    use ppp::{HeaderResult, PartialResult};
    let header = HeaderResult::parse(buf);
    if header.is_incomplete() {
        return Parsed::Incomplete;
    }
    match header {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => Source::Local,
            };
            Parsed::Header {
                source,
                len: h.header.len(),
            }
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                    Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                    Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => Source::Local,
            };
            Parsed::Header {
                source,
                len: h.len(),
            }
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

/// Reads the header at the start of `stream`: whom it names, and the bytes read past it (to be
/// read again before the rest of the stream).
pub async fn read_header(stream: &mut TcpStream) -> Result<(Source, Vec<u8>), Error> {
    let mut buf = vec![0u8; MAX_HEADER_BYTES];
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(Error::Closed);
        }
        filled += n;
        match parse(&buf[..filled]) {
            Parsed::Header { source, len } => {
                buf.truncate(filled);
                buf.drain(..len);
                return Ok((source, buf));
            }
            Parsed::Invalid(why) => return Err(Error::Invalid(why)),
            Parsed::Incomplete if filled == buf.len() => return Err(Error::TooLong),
            Parsed::Incomplete => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_and_2_name_the_client_and_local_keeps_the_socket() {
        let v1 = b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 443\r\n\x16\x03\x01";
        assert_eq!(
            parse(v1),
            Parsed::Header {
                source: Source::Client("127.0.0.9:40000".parse().unwrap()),
                len: v1.len() - 3
            }
        );
        let v1_6 = b"PROXY TCP6 2001:db8::1 ::1 5 443\r\n";
        assert_eq!(
            parse(v1_6),
            Parsed::Header {
                source: Source::Client("[2001:db8::1]:5".parse().unwrap()),
                len: v1_6.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                source: Source::Local,
                len: 15
            }
        );
        let client: SocketAddr = "127.0.0.9:40000".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, server),
        )
        .build()
        .unwrap();
        assert_eq!(
            parse(&v2),
            Parsed::Header {
                source: Source::Client(client),
                len: v2.len()
            }
        );
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Stream,
            (client, server),
        )
        .build()
        .unwrap();
        assert!(matches!(
            parse(&local),
            Parsed::Header {
                source: Source::Local,
                ..
            }
        ));
        // Prefixes are incomplete; anything else is invalid.
        assert_eq!(parse(b"PROXY TCP4 127.0"), Parsed::Incomplete);
        assert_eq!(parse(&v2[..20]), Parsed::Incomplete);
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 127.0.0.999 127.0.0.1 1 2\r\n"),
            Parsed::Invalid(_)
        ));
    }
}
