//! `POST /api/publish`: the HTTP publish API pinned in DESIGN.md §2.
//!
//! Body: one `{"topic", "event", "payload"}` object, or an array of them (published in order);
//! an item may add `"exclude": "<sender id>"` to leave out the connection a forwarded push came
//! from ("send to others").
//! Answers `200 {"position": ...}` or `200 {"positions": [...]}`; `400`/`413` with
//! `{"error": "..."}` naming the problem; `401` for a wrong or missing bearer token.
//! A batch is validated whole before anything is published, so a bad item publishes nothing.

use crate::app::App;
use crate::protocol;
use crate::respond::{Answer, error_response, json_response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;

/// One message to publish, borrowed from the request body where JSON escapes allow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    /// A sender id (a forwarded push's `sender`): that connection does not get the message.
    #[serde(borrow, default)]
    exclude: Option<std::borrow::Cow<'a, str>>,
}

/// 405 with the method the path takes (`Allow`).
fn method_not_allowed(allow: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, message);
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries the publish token.
fn authorized(app: &App, authorization: Option<&[u8]>) -> bool {
    let Some(value) = authorization.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(token.trim().as_bytes(), app.publish_token.as_bytes())
}

/// Why a publish item was refused, before it reaches a topic: the `error` of the 400 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum InvalidItem {
    #[error("\"topic\" must be 1 to {} bytes", protocol::MAX_FIELD_BYTES)]
    TopicLength,
    #[error(
        "\"topic\" must not be \"{}\" (reserved for heartbeats)",
        protocol::PHOENIX_TOPIC
    )]
    ReservedTopic,
    #[error("\"event\" must be 1 to {} bytes", protocol::MAX_FIELD_BYTES)]
    EventLength,
    #[error("\"event\" must not start with \"phx_\" (reserved by the protocol)")]
    ReservedEvent,
    #[error("\"exclude\" must be a sender id, as a forwarded push's \"sender\" gives it")]
    Exclude,
}

fn validate(item: &PublishItem) -> Result<(), InvalidItem> {
    if item.topic.is_empty() || item.topic.len() > protocol::MAX_FIELD_BYTES {
        return Err(InvalidItem::TopicLength);
    }
    if item.topic == protocol::PHOENIX_TOPIC {
        return Err(InvalidItem::ReservedTopic);
    }
    if item.event.is_empty() || item.event.len() > protocol::MAX_FIELD_BYTES {
        return Err(InvalidItem::EventLength);
    }
    if item.event.starts_with("phx_") {
        return Err(InvalidItem::ReservedEvent);
    }
    if let Some(e) = &item.exclude
        && !crate::session::is_sender_id(e)
    {
        return Err(InvalidItem::Exclude);
    }
    Ok(())
}

fn parse_item(raw: &str) -> Result<PublishItem<'_>, String> {
    // serde's derive would also take the fields as an array (`["t", "e", 1]`): not our API.
    let object = raw.trim_start().starts_with('{');
    // Fast path: one pass, no bookkeeping. Only a bad item pays for a precise message.
    if let Ok(item) = serde_json::from_str::<PublishItem>(raw)
        && object
    {
        validate(&item).map_err(|e| e.to_string())?;
        return Ok(item);
    }
    if let Err(e) = serde_json::from_str::<&RawValue>(raw) {
        return Err(format!("invalid JSON: {e}"));
    }
    if !object {
        return Err("must be an object {\"topic\", \"event\", \"payload\"}".into());
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let item: PublishItem = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = if path == "."
            || msg.starts_with("missing field")
            || msg.starts_with("unknown field")
        {
            msg
        } else {
            format!("\"{path}\": {msg}")
        };
        // serde's messages are good ("missing field `topic`"); drop the position suffix for
        // an item inside a batch, where it would point into the item, not the body.
        msg.split(" at line ").next().unwrap_or(&msg).to_string()
    })?;
    validate(&item).map_err(|e| e.to_string())?;
    Ok(item)
}

/// The checks made before the body is read: the bearer token, then the declared size.
/// `Ok` carries the body size limit.
pub fn check_head(
    app: &App,
    authorization: Option<&[u8]>,
    content_length: Option<u64>,
) -> Result<usize, Answer> {
    if !authorized(app, authorization) {
        return Err(unauthorized());
    }
    let limit = app.config.publish.max_body_bytes;
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_big(limit));
    }
    Ok(limit)
}

fn unauthorized() -> Answer {
    let mut a = Answer::error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer <PUSHGATE_PUBLISH_TOKEN>)",
    );
    a.bearer_challenge = true;
    a
}

pub fn too_big(limit: usize) -> Answer {
    Answer::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("body larger than {limit} bytes (publish.max_body_bytes)"),
    )
}

/// Handles `POST /api/publish` (served by hyper).
pub async fn publish(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST {
        return method_not_allowed("POST", "use POST to publish");
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let limit = match check_head(&app, authorization, declared) {
        Ok(limit) => limit,
        Err(a) => return a.into_response(),
    };
    let body = crate::deadline::Body::new(req.into_body(), crate::deadline::body_stall(&app));
    let body = match Limited::new(body, limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if crate::deadline::is_timeout(&e) {
                return crate::deadline::body_timed_out(&app);
            }
            if e.is::<http_body_util::LengthLimitError>() {
                return too_big(limit).into_response();
            }
            return error_response(StatusCode::BAD_REQUEST, "could not read the request body");
        }
    };
    publish_body(&app, &body).await.into_response()
}

/// Publishes what an authorized request's body asks for.
pub async fn publish_body(app: &App, body: &[u8]) -> Answer {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(_) => return Answer::error(StatusCode::BAD_REQUEST, "body is not UTF-8"),
    };
    let is_batch = text.trim_start().starts_with('[');
    let items: Vec<PublishItem> = if is_batch {
        let raws: Vec<&RawValue> = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                return Answer::error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}"));
            }
        };
        if raws.is_empty() {
            return Answer::error(StatusCode::BAD_REQUEST, "empty batch: nothing to publish");
        }
        let mut items = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            match parse_item(raw.get()) {
                Ok(item) => items.push(item),
                Err(e) => {
                    return Answer::error(StatusCode::BAD_REQUEST, &format!("item {i}: {e}"));
                }
            }
        }
        items
    } else {
        match parse_item(text) {
            Ok(item) => vec![item],
            Err(e) => return Answer::error(StatusCode::BAD_REQUEST, &e),
        }
    };
    let mut body = Vec::with_capacity(32 * items.len() + 16);
    if is_batch {
        body.extend_from_slice(b"{\"positions\":[");
    } else {
        body.extend_from_slice(b"{\"position\":");
    }
    let messages: Vec<crate::broker::Message> = items
        .iter()
        .map(|i| crate::broker::Message {
            topic: i.topic.as_ref(),
            event: i.event.as_ref(),
            payload: i.payload.get(),
            exclude: i.exclude.as_deref(),
        })
        .collect();
    let positions = match app.broker.publish(&messages).await {
        Ok(p) => p,
        Err(crate::broker::PublishError::Unavailable(e)) => {
            tracing::warn!(error = ?e.to_string(), "publish failed: broker unavailable");
            return Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("broker unavailable, nothing published after the first failure: {e}"),
            );
        }
        Err(crate::broker::PublishError::Rejected(e)) => {
            return Answer::error(StatusCode::BAD_REQUEST, &e);
        }
    };
    for (i, pos) in positions.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        protocol::push_json_str(&mut body, pos);
    }
    body.extend_from_slice(if is_batch { b"]}" } else { b"}" });
    Answer {
        status: StatusCode::OK,
        body,
        bearer_challenge: false,
    }
}

/// Handles `GET /api/presence?topic=T` (the publish token as bearer): who is on a presence
/// topic, on every node: `{"topic": T, "presences": {key: {"metas": [...]}}}`, what a joiner's
/// `presence_state` would say.
pub async fn presence(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return method_not_allowed("GET", "use GET for presence");
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !authorized(&app, authorization) {
        return unauthorized().into_response();
    }
    let topic = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "topic")
            .map(|(_, v)| v.into_owned())
    });
    let Some(topic) = topic.filter(|t| !t.is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing topic: GET /api/presence?topic=<topic>",
        );
    };
    let Some(presence) = app.presence.as_ref().filter(|p| p.tracks(&topic)) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not a presence topic (presence.topics)",
        );
    };
    match presence.list(&topic).await {
        Ok(state) => {
            let mut body = Vec::with_capacity(32 + topic.len() + state.len());
            body.extend_from_slice(b"{\"topic\":");
            protocol::push_json_str(&mut body, &topic);
            body.extend_from_slice(b",\"presences\":");
            body.extend_from_slice(&state);
            body.push(b'}');
            json_response(StatusCode::OK, body)
        }
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_items_are_refused_with_the_same_words() {
        let refused = |raw: &str| parse_item(raw).map(|_| ()).unwrap_err();
        let long = "t".repeat(protocol::MAX_FIELD_BYTES + 1);
        for (raw, why) in [
            (
                format!(r#"{{"topic":"{long}","event":"e","payload":1}}"#),
                r#""topic" must be 1 to 255 bytes"#,
            ),
            (
                r#"{"topic":"phoenix","event":"e","payload":1}"#.to_string(),
                r#""topic" must not be "phoenix" (reserved for heartbeats)"#,
            ),
            (
                r#"{"topic":"t","event":"","payload":1}"#.to_string(),
                r#""event" must be 1 to 255 bytes"#,
            ),
            (
                r#"{"topic":"t","event":"phx_reply","payload":1}"#.to_string(),
                r#""event" must not start with "phx_" (reserved by the protocol)"#,
            ),
            (
                r#"{"topic":"t","event":"e","payload":1,"exclude":"?"}"#.to_string(),
                r#""exclude" must be a sender id, as a forwarded push's "sender" gives it"#,
            ),
        ] {
            assert_eq!(refused(&raw), why);
        }
    }
}
