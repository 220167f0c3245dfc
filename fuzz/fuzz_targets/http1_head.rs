//! The lean HTTP/1.1 loop's head parser and request framing (`http1::parse`, the peek of
//! `http1::first`), against hyper's HTTP/1 server, which serves everything else.
//!
//! Properties, for bytes the lean loop takes as one of its requests:
//! - hyper, given the same request followed by another, serves the same method and path, reads
//!   the same body (so both end the request at the same byte: no request smuggling between the
//!   two paths) and then serves the following request;
//! - the headers the lean loop reads (authorization, the LongPoll and auth tokens, origin,
//!   x-forwarded-for, the query) are the values hyper's handlers would read;
//! - no prefix of the head is taken for anything but "more bytes needed" (how the bytes are
//!   split across reads changes nothing), and the peek at the first line never picks the lean
//!   loop for a request the parser then routes elsewhere.
#![no_main]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use libfuzzer_sys::fuzz_target;
use pushgate::fuzzing::{LeanHead, lean_head, lean_peek};
use pushgate_fuzz::Cursor;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The request that follows: it closes the connection, so hyper ends once it is served. (The
/// client never half-closes: hyper stops reading pipelined requests at EOF.)
const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: hyper::HeaderMap,
    body: Result<Vec<u8>, String>,
}

/// What hyper's HTTP/1 server serves from `bytes`, request by request, and what it answers.
fn hyper_serves(bytes: Vec<u8>) -> (Vec<Seen>, Vec<u8>) {
    pushgate_fuzz::block_on(async move {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let record = seen.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .map_err(|e| e.to_string());
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().map(str::to_string),
                    headers: parts.headers,
                    body,
                });
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let answered = Arc::new(Mutex::new(Vec::new()));
        let out = answered.clone();
        let talk = async move {
            client.write_all(&bytes).await.ok();
            let mut sink = Vec::new();
            client.read_to_end(&mut sink).await.ok();
            *out.lock().unwrap() = sink;
        };
        // Time is paused: if hyper waits for bytes that never come (it reads the request as
        // longer than the lean loop does), the timeout fires as soon as nothing else can run.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            tokio::join!(conn, talk)
        })
        .await;
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let answered = std::mem::take(&mut *answered.lock().unwrap());
        (seen, answered)
    })
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let longpoll = c.byte() & 1 == 0;
    let cut = c.u16() as usize;
    let buf = c.rest();
    let LeanHead::Ours(req) = lean_head(buf, longpoll) else {
        return;
    };
    // Every shorter prefix of the head only asks for more bytes.
    for k in [req.head_len - 1, cut % req.head_len] {
        assert_eq!(
            lean_head(&buf[..k], longpoll),
            LeanHead::Partial,
            "the prefix of {k} bytes is not 'more needed'"
        );
    }
    if let Some(peeked) = lean_peek(buf, longpoll) {
        assert_eq!(
            peeked,
            (req.method, req.path),
            "peek and parse route differently"
        );
    }
    // (The lean loop refuses a body over its limit before it adds the length to anything.)
    let Some(end) = (req.head_len as u64)
        .checked_add(req.content_length)
        .filter(|end| *end <= buf.len() as u64)
    else {
        return;
    };
    let end = end as usize;
    let mut bytes = buf[..end].to_vec();
    bytes.extend_from_slice(NEXT);
    let (seen, answered) = hyper_serves(bytes);
    let text = String::from_utf8_lossy(&buf[..end]);
    let Some(first) = seen.first() else {
        // hyper refuses it outright (400, and the connection ends), where the lean loop serves
        // it: a difference in what is accepted (the lean loop takes any request-target httparse
        // takes; hyper's URI parser refuses some bytes, such as `"`), never in where a request
        // ends, since hyper reads nothing further on that connection.
        assert!(
            answered.starts_with(b"HTTP/1.1 400 "),
            "hyper neither served nor refused {text:?}: {:?}",
            String::from_utf8_lossy(&answered)
        );
        return;
    };
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        (req.method, req.path)
    );
    assert_eq!(
        first.body.as_deref(),
        Ok(&buf[req.head_len..end]),
        "hyper reads another body: {text:?}"
    );
    assert_eq!(
        first.query.as_deref().unwrap_or("").as_bytes(),
        req.query.as_slice(),
        "query"
    );
    let header = |name: &str| first.headers.get(name).map(|v| v.as_bytes().to_vec());
    assert_eq!(header("authorization"), req.authorization, "authorization");
    assert_eq!(
        header("x-phoenix-longpoll-token"),
        req.longpoll_token,
        "longpoll token"
    );
    assert_eq!(header("x-phoenix-authtoken"), req.auth_token, "auth token");
    assert_eq!(header("origin"), req.origin, "origin");
    assert_eq!(
        header("x-forwarded-for"),
        req.forwarded_for,
        "x-forwarded-for"
    );
    if !req.close {
        assert_eq!(
            seen.get(1).map(|s| s.path.as_str()),
            Some("/next"),
            "hyper does not find the next request where the lean loop does: {text:?} {seen:?}"
        );
    }
});
